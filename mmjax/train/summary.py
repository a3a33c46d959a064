"""`summary.md`: what ran, for how long, and the final metrics."""

from __future__ import annotations

import os
from typing import Mapping


def metrics_table(metrics: Mapping[str, float]) -> str:
  lines = ["| metric | value |", "|---|---|"]
  for k in sorted(metrics):
    v = metrics[k]
    lines.append(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |")
  return "\n".join(lines)


def write_summary(workdir: str, config, metrics: Mapping[str, float], *, wall_time: float,
                  start_step: int = 0, extra_sections: Mapping[str, str] = ()) -> str:
  path = os.path.join(workdir, "summary.md")
  resumed = f" (resumed from step {start_step})" if start_step else ""
  parts = [
      f"# {config.name}",
      "",
      f"- steps: {config.total_steps}{resumed}",
      f"- global batch size: {config.batch_size}",
      f"- wall time of this run: {wall_time:.1f} s",
      f"- modalities: {', '.join(sorted(config.model.encoders.keys()))}",
      f"- objective: {config.objective.kind}",
      "",
      "## Final metrics",
      "",
      metrics_table(metrics),
  ]
  for title, body in dict(extra_sections).items():
    parts += ["", f"## {title}", "", body]
  with open(path, "w") as f:
    f.write("\n".join(parts) + "\n")
  return path
