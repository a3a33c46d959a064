"""CLIP-style image <-> text alignment on the procedural world (the Quickstart run).

  python -m mmjax.main --config=configs/default.py --workdir=runs/default
  python -m mmjax.main --config=configs/default.py:runlocal --workdir=/tmp/tiny
  python -m mmjax.main --config=configs/default.py:fsdp --workdir=runs/default_fsdp
  (variants join with ',': configs/default.py:fsdp,runlocal)
"""

from mmjax import config_lib


VARIANTS = ("fsdp", "runlocal")


def get_config(arg=None):
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  if variants - set(VARIANTS):
    raise ValueError(f"configs/default.py: unknown variant(s) {sorted(variants - set(VARIANTS))}"
                     f"; the variants are {list(VARIANTS)}, joined by ',' (e.g. 'fsdp,runlocal')")
  c = config_lib.base_config()
  c.name = "default"
  # Tuned for the 2-core CPU budget (benchmarks/README.md, "Default experiment"): at a fixed
  # number of samples, batch 128 beat 64 (too few hard negatives: shape is rarely the only
  # difference within a batch) and 256 (too few steps). 900 steps: seeds 0, 1, 2 reach
  # 83% / 87% of the R@1 ceiling on average, none below 79.9%, in under 5 minutes.
  c.total_steps = 900
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 450
  c.eval_every_steps = 450
  c.data.modalities = ("image", "text")
  # Sums over devices in device order: the same run on 1 x 8 or 2 x 4 devices gives the
  # same losses (docs/scaling.md); free on one device, n x a small gradient on n.
  c.deterministic_reductions = True
  # Hard negatives: each batch is 32 groups of 4 samples that share colour, size and
  # position, so the towers must tell shapes apart (the factor a random batch of 128
  # rarely asks for). 0.574 -> 0.621 image->text R@1 at the same 800 steps
  # (benchmarks/README.md, "Default experiment").
  c.data.group_batches.size = 4
  c.model.embed_dim = 128
  c.data.text_max_len = 56
  # A convolutional stem sees shape on 32 px images in hundreds of steps where the linear
  # patch embedding needs thousands (benchmarks/README.md, "Default experiment").
  c.model.encoders.image = config_lib.encoder("vit", "mu", patch_size=8, width=128, depth=2,
                                             stem="conv")
  c.model.encoders.text = config_lib.encoder("text", "mu", width=64, depth=2, max_len=56)
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  # Retrieval at every evaluation; the others once, at the end (every=0). All embed the
  # test split with the same batch size, so they share one pass over it.
  c.evals.retrieval = config_lib.evaluator_config("retrieval")     # every: eval_every_steps
  c.evals.zero_shot = config_lib.evaluator_config("zero_shot", every=0)
  c.evals.linear_probe = config_lib.evaluator_config("linear_probe", every=0,
                                                     train_examples=2048)
  c.evals.knn = config_lib.evaluator_config("knn", every=0, train_examples=2048)
  c.evals.calibration = config_lib.evaluator_config("calibration", every=0)
  c.evals.geometry = config_lib.evaluator_config("geometry", every=0)
  if "fsdp" in variants:     # the same run with params and optimizer state sharded (docs/scaling.md)
    c.mesh.data, c.mesh.fsdp = 1, -1
    # The towers are small: shard every weight matrix (4096 elements and up), so that the
    # run exercises the layout it would take at scale; biases and norms stay replicated.
    c.sharding.fsdp_min_size = 2 ** 12
  if "runlocal" in variants:     # seconds, for tests and a first look
    c.total_steps = 20
    c.batch_size = 32
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.eval_every_steps = 10
    c.data.sizes.test = 64
    c.data.sizes.validation = 64
    for entry in c.evals.values():
      entry.batch_size = 32
    c.evals.linear_probe.train_examples = c.evals.knn.train_examples = 256
  return c
