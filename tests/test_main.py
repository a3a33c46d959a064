"""The command line's logging: the libraries' INFO lines are off unless asked for."""
import logging
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from mmjax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's log line format: 'I1201 21:05:07.186305 140702117862272 checkpoint_manager.py:1527] ...'
INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] (.*)$", re.M)


def _run(workdir, *extra):
  env = dict(os.environ, CI="true", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = os.environ.get("MMJAX_TEST_CHILD_XLA_FLAGS", "")
  cmd = [sys.executable, "-m", "mmjax.main", "--config=tests/configs/tiny.py",
         f"--workdir={workdir}", "--config.total_steps=2",
         "--config.checkpoint_every_steps=2", "--config.eval_every_steps=2", *extra]
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout + done.stderr


def test_cli_is_quiet_by_default_and_verbose_with_verbosity(tmp_path):
  quiet = _run(tmp_path / "quiet")
  assert "step 2/2" in quiet and "eval at step 2" in quiet
  assert INFO_LINE.findall(quiet) == [], quiet[:3000]
  assert os.path.isdir(tmp_path / "quiet" / "checkpoints" / "2")   # it did save

  verbose = _run(tmp_path / "verbose", "--verbosity=0")
  assert "step 2/2" in verbose
  orbax = [message for source, message in INFO_LINE.findall(verbose)
           if "checkpoint" in source or "checkpoint" in message]
  assert any("Saving checkpoint at step 2" in m for m in orbax), verbose[:3000]


@pytest.fixture
def restore_levels():
  levels = {n: logging.getLogger(n).level for n in main_lib.QUIET_LOGGERS}
  yield
  for n, level in levels.items():
    logging.getLogger(n).setLevel(level)


def _flag_values(*argv):
  fv = flags.FlagValues()
  flags.DEFINE_integer("verbosity", 0, "", flag_values=fv, short_name="v")
  flags.DEFINE_multi_string("logger_levels", [], "", flag_values=fv)
  flags.DEFINE_boolean("logtostderr", False, "", flag_values=fv)
  flags.DEFINE_boolean("alsologtostderr", False, "", flag_values=fv)
  fv(["prog", *argv])
  return fv


@pytest.mark.parametrize("argv", [["-v", "0"], ["--verbosity=1"], ["--logtostderr"],
                                  ["--alsologtostderr"], ["--logger_levels=orbax:INFO"]])
def test_a_logging_flag_keeps_the_levels(argv, restore_levels):
  for n in main_lib.QUIET_LOGGERS:
    logging.getLogger(n).setLevel(logging.NOTSET)
  assert main_lib.quiet_library_logs(_flag_values(*argv)) is False
  assert all(logging.getLogger(n).level == logging.NOTSET for n in main_lib.QUIET_LOGGERS)


def test_without_logging_flags_libraries_keep_warnings_only(restore_levels):
  assert main_lib.quiet_library_logs(_flag_values()) is True
  for n in ("orbax", "orbax.checkpoint", "absl", "jax._src.xla_bridge"):
    assert not logging.getLogger(n).isEnabledFor(logging.INFO), n
    assert logging.getLogger(n).isEnabledFor(logging.WARNING), n
