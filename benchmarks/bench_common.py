"""What the training benchmarks share: a config from `configs/` with dotted-field
overrides, and a line naming the machine's load before each measured part."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None, **fields):
  """`configs/<name>.py:<arg>` with `fields` ({'data.data_dir': ...}) set; a field
  the config lacks is an error (the config is locked)."""
  from mmjax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"), arg)
  config.update_from_flattened_dict(fields)
  return config


def note_load(part):
  """Prints the load average before `part` (flagging a busy machine); returns the
  1-minute figure, for the tables."""
  load1, load5, _ = os.getloadavg()
  flag = "  (busy machine: re-measure alone)" if load1 > 1.5 else ""
  print(f"\n== {part}: load average {load1:.2f} (1 min), {load5:.2f} (5 min){flag}",
        flush=True)
  return round(load1, 2)
