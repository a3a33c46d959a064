"""mmjax.fusion: combine the present modalities into one joint representation.

Every module: `fuse = build_fusion(kind, **config)`, then
`joint, aux = fuse.apply(variables, features, mask, train=..., rngs=...)` with
features dict modality -> [B, D], mask dict modality -> bool [B] (True =
present). joint is [B, D_out]; aux holds weighted auxiliary losses under
'loss/<name>' (the trainer adds them all) and statistics under 'stats/<name>'.
`late` returns task outputs directly (`produces_task_output`).

Token-level kinds (`needs_tokens`: bottleneck, cross_attention, joint, ovo_tokens,
mmp, proxy)
are called as `module.apply(variables, tokens, token_mask, mask, ...)` with tokens
dict modality -> [B, T_m, D] and token_mask dict modality -> bool [B, T_m]
(`mmjax.fusion.tokens`).
"""
from mmjax.fusion.attention import AttentionFusion, OvOFusion
from mmjax.fusion.common import (check_mask, combination_index, masked_mean,
                                 modality_dropout, stack_mask, stack_modalities)
from mmjax.fusion.flexmoe import (S_ROUTERS, FlexMoEFusion, MissingModalityBank,
                                  code_router_losses, cv_squared,
                                  importance_load_loss, num_combinations,
                                  smooth_top_k_load, specialization_loss,
                                  warmup_order)
from mmjax.fusion.gated import (GatedFusion, curriculum_rate,
                                entropy_curriculum_mask, gate_entropy)
from mmjax.fusion.heads import TASK_KINDS, TaskHead, task_loss
from mmjax.fusion.moe import (MoEFusion, SparseMoE, dispatch_and_combine,
                              expert_capacity, load_balancing_loss,
                              router_z_loss, top_k_routing)
from mmjax.fusion.registry import (FUSION_KINDS, FUSION_MODULES,
                                   FusionWithTaskHead, build_fusion,
                                   build_fusion_from_config, fusion_config_fields,
                                   needs_tokens)
from mmjax.fusion.simple import ConcatFusion, LateFusion, MeanFusion
from mmjax.fusion.mmp import MMPFusion
from mmjax.fusion.proxy import ProxyTokenFusion
from mmjax.fusion.tokens import (BottleneckFusion, CrossAttentionFusion, JointFusion,
                                 OvOTokenFusion, stack_token_inputs)
