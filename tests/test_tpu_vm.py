"""tools/tpu_vm.sh: the dry-run commands of every slice it names parse, name the right
accelerator type and runtime, reach every host, and launch trainings whose config files exist
and whose overrides are fields of those configs."""

import math
import os
import re
import shlex
import subprocess

import pytest

from llama_jax import experiment, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "tpu_vm.sh")
STEPS = ("create", "install", "mount", "tiny", "plan", "data", "convert", "train8b", "ssh",
         "delete")
ENV = dict(os.environ, BUCKET="my-bucket", DATA_DIR="corpus", CHECKPOINT="/home/me/Llama-3-8B")
# slice: (accelerator type, runtime, chips, hosts), from the Cloud TPU documentation's tables.
KNOWN = {"v5e-8": ("v5litepod-8", "v2-alpha-tpuv5-lite", 8, 1),
         "v5e-16": ("v5litepod-16", "v2-alpha-tpuv5-lite", 16, 2),
         "v6e-8": ("v6e-8", "v2-alpha-tpuv6e", 8, 1),
         "v6e-256": ("v6e-256", "v2-alpha-tpuv6e", 256, 32),
         "v5p-8": ("v5p-8", "v2-alpha-tpuv5", 4, 1),
         "v5p-32": ("v5p-32", "v2-alpha-tpuv5", 16, 4),
         "v4-8": ("v4-8", "tpu-ubuntu2204-base", 4, 1),
         "v4-32": ("v4-32", "tpu-ubuntu2204-base", 16, 4)}


def named_slices() -> list[str]:
    """The slices the script's header lists (`v5e-1 v5e-4 ...` lines)."""
    with open(SCRIPT) as f:
        head = f.read().split("set -euo pipefail")[0]
    return re.findall(r"\b(v(?:4|5e|5p|6e)-\d+)\b(?!\s*\()", head.split("# STEP")[0])


def dry_run(slice_, step, env=ENV):
    return subprocess.run(["bash", SCRIPT, slice_, step], capture_output=True, text=True, env=env)


def commands(slice_, step) -> list[list[str]]:
    out = dry_run(slice_, step)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[0] if values else None


def launches(remote: str) -> list[list[str]]:
    """The python invocations inside an ssh --command (split at ; and &&)."""
    parts = re.split(r";|&&", remote)
    return [shlex.split(p) for p in parts if ".venv/bin/python" in p]


def check_launch(argv, chips, hosts):
    """A train.py / plan.py / convert launch: a config that exists, overrides that are fields."""
    script = argv[1]
    assert os.path.isfile(os.path.join(ROOT, script)), script
    if script == "tools/convert_checkpoint.py":
        return
    config_file = option(argv, "config")
    config = experiment.load(os.path.join(ROOT, config_file))
    for item in (a for a in argv if a.startswith("--config.")):
        plan.set_value(config, item)  # raises on a field the config does not have
    if script == "experiments/train.py":
        assert ("--distributed" in argv) == (hosts > 1)
        assert option(argv, "workdir").startswith("$HOME/bucket/")  # shared by the hosts
    assert config.data.global_batch % chips == 0  # the batch splits over every device
    return config


def test_the_header_names_every_generation():
    names = named_slices()
    assert set(KNOWN) <= set(names) and len(names) >= 20


@pytest.mark.parametrize("slice_", named_slices())
def test_every_step_of_every_slice(slice_):
    accel, runtime, chips, hosts = KNOWN.get(slice_, (None, None, None, None))
    for step in STEPS:
        for argv in commands(slice_, step):
            if argv[0] == "gcloud":
                assert argv[1:4] == ["compute", "tpus", "tpu-vm"]
                assert argv[4] in ("create", "scp", "ssh", "delete") and option(argv, "zone")
            if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]:
                accel_given, runtime_given = option(argv, "accelerator-type"), option(argv,
                                                                                      "version")
                if accel:
                    assert (accel_given, runtime_given) == (accel, runtime)
                gen, n = slice_.rsplit("-", 1)
                chips = chips or (int(n) if gen in ("v5e", "v6e") else int(n) // 2)
                hosts = hosts or math.ceil(chips / (8 if gen in ("v5e", "v6e") else 4))
            if step in ("install", "mount", "tiny", "data", "train8b") and argv[0] == "gcloud":
                assert "--worker=all" in argv  # every host of the slice
            if argv[0] == "gcloud" and argv[4] == "ssh" and option(argv, "command"):
                for launch in launches(option(argv, "command")):
                    check_launch(launch, chips, hosts)
            if step == "plan":
                config = check_launch(argv, chips, hosts)
                target = option(argv, "target")
                dims = target.split(":")[1].split("x")
                assert math.prod(map(int, dims)) == chips
                assert target.startswith(slice_.rsplit("-", 1)[0] + ":")
                assert config.data.seq_len == 8192


def test_convert_writes_what_train8b_starts_from():
    remote = option(commands("v5p-32", "convert")[0], "command")
    output = option(launches(remote)[0], "output")
    train = launches(option(commands("v5p-32", "train8b")[0], "command"))[0]
    assert option(train, "config.train.init_from") == output
    assert option(train, "config.data.tokenizer") == output + "/tokenizer.model"


@pytest.mark.parametrize("args, env, message", [
    (("v9-8", "create"), ENV, "unknown slice v9-8"),
    (("v5e-8", "launch"), ENV, "unknown step launch"),
    (("v5e-16", "tiny"), {k: v for k, v in ENV.items() if k != "BUCKET"}, "set BUCKET"),
    (("v5e-8", "data"), {k: v for k, v in ENV.items() if k != "DATA_DIR"}, "needs DATA_DIR"),
])
def test_plain_mistakes_end_in_one_line(args, env, message):
    out = dry_run(*args, env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert out.stderr.count("\n") == 1


def test_a_bucket_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from llama_jax import train
    monkeypatch.chdir(tmp_path)
    config = experiment.load(os.path.join(ROOT, "experiments", "configs", "tiny.py:test"))
    with pytest.raises(ValueError, match="is a URL, .* mount the bucket"):
        train.run(config, "gs://my-bucket/run")
    assert os.listdir(tmp_path) == []  # no local "gs:" folder
