"""Rendering speed of the procedural world on one CPU core.

Renders the default world (configs/default.py's data config, with audio added unless
--modalities says otherwise) sample by sample, as the grain pipeline does, pinned to one
core, in samples per CPU-second (process time, so a busy machine does not skew it).
The reference in the same run is the floor of any renderer: drawing the latent
factors alone (the per-sample RNG set-up), so the ratio shows what rendering costs.

    python benchmarks/bench_world.py [--samples 4000] [--modalities image,audio,text]
"""
import argparse
import os
import time

from mmjax import config_lib
from mmjax.data import world as world_lib


def rate(fn, n: int) -> float:
  fn(0)                               # warm caches
  start = time.process_time()         # CPU time: other jobs on the machine do not count
  for i in range(n):
    fn(i)
  return n / (time.process_time() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=4000)
  parser.add_argument("--modalities", default="image,audio,text")
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  modalities = tuple(args.modalities.split(","))
  spec = world_lib.WorldSpec.from_config(config_lib.world_data(modalities))
  world = world_lib.World(spec, "train")
  floor = rate(world.factors, args.samples)
  print(f"world {modalities}: {spec.image_size}px images, {spec.audio_samples}-sample audio")
  print(f"factors only (floor): {floor:9.0f} samples/s")
  for m in modalities:
    single = world_lib.World(world_lib.WorldSpec.from_config(config_lib.world_data((m,))),
                             "train")
    print(f"{m:>6} only:          {rate(single.__getitem__, args.samples):9.0f} samples/s")
  full = rate(world.__getitem__, args.samples)
  print(f"all modalities:       {full:9.0f} samples/s  (floor / all = {floor / full:.1f}x;"
        f" target >= 2000 samples/s on one core)")


if __name__ == "__main__":
  main()
