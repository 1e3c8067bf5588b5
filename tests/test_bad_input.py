"""Every command under bad input, faults and misuse, through the real CLI (a subprocess).

Each case asserts the promise of docs/guarantees.md: exit status 2, one line on stderr that
names the cause (progress bars aside), no traceback, no new or changed file outside the
command's own output, and every file that existed before byte-identical afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from nla.bundle import NLA, LoraSettings
from nla.config import save_config
from nla.train.rl import RLConfig

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
       "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- fixtures: one tiny world, copied per case
@pytest.fixture(scope="module")
def world(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/ (a dataset), run/ (a bundle), lora/ (a LoRA bundle), sft/ (an SFT run's config)."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_dataset, root / "data")
    NLA.initialize("tiny:llama", dataset=tiny_dataset).save_pretrained(root / "run")
    NLA.initialize("tiny:llama", dataset=tiny_dataset, lora=LoraSettings(r=2)).save_pretrained(root / "lora")
    (root / "sft").mkdir()
    (root / "sft" / "train_config.yaml").write_text(yaml.safe_dump({"data": "data", "out": "sft", "init": None,
                                                                     "precision": "fp32", "lr": 2e-4}))
    rl = root / "rlrun"
    rl.mkdir()
    save_config(RLConfig(nla="run", data="data", out="rlrun", lr=1e-5), rl / "train_config.yaml")
    (rl / "metrics.jsonl").write_text('{"step": 1, "phase": "rl", "loss": 0.5}\n')
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes\n")
    (root / "afile").write_text("not a folder\n")
    (root / "conf").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def corrupt(path: Path) -> None:
    """Keep the first 100 bytes: a truncated download or a half-copied file."""
    path.write_bytes(path.read_bytes()[:100])


def nan_value_head(path: Path) -> None:
    """A value head whose weights went NaN (a diverged run): the AR's output is NaN."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v.float() * float("nan") for k, v in tensors.items()}, str(path))


def set_scale(meta: Path, value: float) -> None:
    data = yaml.safe_load(meta.read_text())
    data["injection"]["scale"] = value
    meta.write_text(yaml.safe_dump(data))


def cuda_missing_device() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@dataclass
class Case:
    name: str
    argv: list[str]
    needle: str  # what the one stderr line must say
    setup: Callable[[Path], None] | None = None
    output: str | None = None  # the command's own output: may change (relative to the world)
    files: dict[str, str] = field(default_factory=dict)  # extra files to write first


DEV = cuda_missing_device()
CASES = [
    # ---- numbers, types and unknown keys, from flags and YAML
    Case("docs-negative", ["extract", "--out", "x", "--docs", "-3"], "--docs: must be at least 1, got -3"),
    Case("docs-zero", ["extract", "--out", "x", "--docs", "0"], "--docs: must be at least 1, got 0"),
    Case("seq-len-zero", ["extract", "--out", "x", "--seq-len", "0"], "--seq-len: must be at least 1"),
    Case("lr-negative", ["train", "sft", "--data", "data", "--out", "x", "--lr", "-1"], "--lr: must be greater than 0"),
    Case("lr-nan", ["train", "sft", "--data", "data", "--out", "x", "--lr", "nan"], "--lr: must be a finite number"),
    Case("lora-r-zero", ["train", "sft", "--data", "data", "--out", "x", "--lora-r", "0"], "--lora-r: must be at least 1"),
    Case("port-out-of-range", ["serve", "--nla", "run", "--port", "70000"], "--port: must be at most 65535"),
    Case("max-n-zero", ["serve", "--nla", "run", "--max-n", "0"], "--max-n: must be at least 1"),
    Case("timeout-negative", ["serve", "--nla", "run", "--timeout-s", "-1"], "--timeout-s: must be greater than 0"),
    Case("steps-ten", ["train", "rl", "--config", "c.yaml", "--nla", "run", "--data", "data", "--out", "x"],
         "steps: expected an integer, got 'ten'", files={"c.yaml": "rl:\n  steps: ten\n"}),
    Case("unknown-key", ["train", "sft", "--config", "c.yaml", "--data", "data", "--out", "x"],
         "unknown setting 'max_stepz'", files={"c.yaml": "sft:\n  max_stepz: 3\n"}),
    Case("rl-string-false", ["run", "c.yaml", "--dry-run"], "rl: expected true or false, got 'false'",
         files={"c.yaml": 'rl: "false"\nwork_dir: w\n'}),
    Case("config-is-a-folder", ["extract", "--config", "conf", "--out", "x"], "conf: is a folder"),
    Case("injection-scale-nan", ["init", "--data", "data", "--out", "x", "--injection-scale", "nan"],
         "--injection-scale must be a positive finite number"),
    Case("csv-corpus", ["extract", "--out", "x", "--corpus", "c.csv", "--model", "tiny:llama", "--device", "cpu"],
         "unsupported corpus file type '.csv'", files={"c.csv": "id,text\n1,hello\n"}),
    # ---- devices that are not there
    Case("device-extract", ["extract", "--out", "x", "--device", DEV], "requested but"),
    Case("device-label", ["label", "--data", "data", "--device", DEV], "requested but"),
    Case("device-eval", ["eval", "--nla", "run", "--data", "data", "--out", "x", "--device", DEV], "requested but"),
    Case("device-rl", ["train", "rl", "--nla", "run", "--data", "data", "--out", "x", "--device", DEV], "requested but"),
    Case("device-verbalize", ["verbalize", "--nla", "run", "--text", "hi", "--device", DEV], "requested but"),
    Case("device-serve", ["serve", "--nla", "run", "--device", DEV], "requested but"),
    # ---- outputs that are not the command's to destroy
    Case("import-over-notes", ["import", "run", "--out", "notes"], "is not an output of nla import"),
    Case("import-over-notes-force", ["import", "run", "--out", "notes", "--force"], "did not write (notes.txt)"),
    Case("import-over-dataset", ["import", "run", "--out", "data", "--force"], "holds an activation dataset"),
    Case("init-over-bundle", ["init", "--data", "data", "--out", "run"], "pass --force to replace it"),
    Case("init-out-is-a-file", ["init", "--data", "data", "--out", "afile"], "afile: is a file"),
    Case("rl-over-dataset", ["train", "rl", "--nla", "run", "--data", "data", "--out", "data", "--force"],
         "holds an activation dataset"),
    Case("rl-over-sft-run", ["train", "rl", "--nla", "run", "--data", "data", "--out", "sft"],
         "holds a run of another command"),
    Case("rl-rerun-without-resume", ["train", "rl", "--nla", "run", "--data", "data", "--out", "rlrun"],
         "pass --resume to continue it or --force"),
    Case("rl-resume-changed-lr", ["train", "rl", "--nla", "run", "--data", "data", "--out", "rlrun", "--resume",
                                  "--lr", "1e-3"], "started with lr=1e-05, this resume asks for 0.001"),
    Case("rl-over-notes", ["train", "rl", "--nla", "run", "--data", "data", "--out", "notes"],
         "is not an output of nla train rl"),
    Case("extract-out-is-a-file", ["extract", "--out", "afile"], "afile: is a file"),
    Case("eval-out-is-a-file", ["eval", "--nla", "run", "--data", "data", "--out", "afile", "--device", "cpu",
                                "--max-rows", "2", "--best-of", "0", "--no-probes", "--no-progress"], "afile"),
    Case("eval-over-dataset", ["eval", "--nla", "run", "--data", "data", "--out", "data", "--force"],
         "holds an activation dataset"),
    Case("eval-over-notes", ["eval", "--nla", "run", "--data", "data", "--out", "notes"],
         "is not an output of nla eval"),
    Case("run-device-missing", ["run", "c.yaml"], "requested but",
         files={"c.yaml": f"work_dir: w\nmodel: tiny:llama\ndevice: {DEV}\n"}),
    Case("reconstruct-out-is-a-folder", ["reconstruct", "--nla", "run", "hello", "--out", "notes"],
         "is a folder; give a .safetensors file path"),
    # ---- damaged files: the message names the file
    Case("corrupt-shard-eval", ["eval", "--nla", "run", "--data", "data", "--out", "x", "--device", "cpu",
                                "--no-progress"], "data/part-00000.parquet: unreadable or corrupt",
         setup=lambda w: corrupt(w / "data" / "part-00000.parquet")),
    Case("corrupt-shard-label", ["label", "--data", "data", "--no-progress"],
         "data/part-00000.parquet: unreadable or corrupt", setup=lambda w: corrupt(w / "data" / "part-00000.parquet")),
    Case("corrupt-av-weights", ["verbalize", "--nla", "run", "--text", "hi", "--device", "cpu"],
         "run/av/model.safetensors: unreadable or corrupt", setup=lambda w: corrupt(w / "run" / "av" / "model.safetensors")),
    Case("corrupt-value-head", ["reconstruct", "--nla", "run", "hello", "--device", "cpu"],
         "run/ar/value_head.safetensors: unreadable or corrupt",
         setup=lambda w: corrupt(w / "run" / "ar" / "value_head.safetensors")),
    Case("corrupt-adapter", ["verbalize", "--nla", "lora", "--text", "hi", "--device", "cpu"],
         "adapter_model.safetensors: unreadable or corrupt",
         setup=lambda w: corrupt(w / "lora" / "av" / "adapter_model.safetensors")),
    Case("nan-value-head", ["reconstruct", "--nla", "run", "hello", "--json", "--device", "cpu"],
         "non-finite values", setup=lambda w: nan_value_head(w / "run" / "ar" / "value_head.safetensors")),
    Case("sidecar-scale-zero", ["verbalize", "--nla", "run", "--text", "hi", "--device", "cpu"],
         "field 'injection.scale' has invalid value 0", setup=lambda w: set_scale(w / "run" / "nla_meta.yaml", 0)),
    Case("sidecar-scale-nan", ["reconstruct", "--nla", "run", "hello", "--device", "cpu"],
         "field 'injection.scale' has invalid value nan", setup=lambda w: set_scale(w / "run" / "nla_meta.yaml",
                                                                                    float("nan"))),
    # ---- text that is not text
    Case("text-not-utf8", ["verbalize", "--nla", "run", "--text", "\udcff\udcfe bad", "--device", "cpu"],
         "--text: not valid UTF-8 text"),
]


def run_cli(argv: list[str], cwd: Path, preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[bytes]:
    # Arguments go as bytes so an invalid UTF-8 byte reaches the process as it would from a shell.
    args = [a.encode("utf-8", "surrogateescape") for a in argv]
    return subprocess.run([sys.executable.encode(), b"-m", b"nla.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, timeout=600, preexec_fn=preexec)


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], needle: str) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 2, f"rc={proc.returncode}\n{err[-3000:]}"
    # Progress bars (carriage-return redraws) and library warnings before the failure are not
    # the error; the error is the one line that starts with "nla ".
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    errors = [ln for ln in lines if ln.startswith("nla ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert ": error: " in errors[0] and needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path) -> None:
    w = Path(shutil.copytree(world, tmp_path / "w"))
    for name, text in case.files.items():
        (w / name).write_text(text)
    if case.setup is not None:
        case.setup(w)
    before = snapshot(w)
    assert_one_line_error(run_cli(case.argv, w), case.needle)
    after = snapshot(w)
    own = case.output
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    stray = sorted(p for p in changed if own is None or not (p == own or p.startswith(own + "/")))
    assert not stray, f"files created or changed outside the output: {stray}"


# ---------------------------------------------------------------- disks that refuse writes
@contextlib.contextmanager
def mounted(tmp_path: Path, options: str) -> Iterator[Path | None]:
    """A small tmpfs (root in a container may mount one); None where mounting is not allowed."""
    point = tmp_path / "mnt"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode:
        yield None
        return
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _readonly(tmp_path: Path) -> contextlib.AbstractContextManager[Path | None]:
    return mounted(tmp_path, "ro,size=64k")


@pytest.mark.parametrize("argv", [
    ["extract", "--out", "{ro}/data", "--model", "tiny:llama", "--device", "cpu", "--docs", "2"],
    ["eval", "--nla", "run", "--data", "data", "--out", "{ro}/report", "--device", "cpu", "--max-rows", "2",
     "--best-of", "0", "--no-probes", "--no-progress"],
    ["init", "--data", "data", "--out", "{ro}/bundle"],
], ids=["extract", "eval", "init"])
def test_read_only_folder_is_one_line_naming_the_path(argv: list[str], world: Path, tmp_path: Path) -> None:
    w = Path(shutil.copytree(world, tmp_path / "w"))
    before = snapshot(w)
    with _readonly(tmp_path) as ro:
        if ro is None:
            # Without mount rights, an unwritable folder is the same fault for a non-root user.
            assert os.geteuid() != 0, "cannot make a read-only folder here (no mount rights as root)"
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o555)
        line = assert_one_line_error(run_cli([a.format(ro=ro) for a in argv], w), str(ro))
    assert "Read-only file system" in line or "Permission denied" in line
    assert snapshot(w) == before


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))


@pytest.mark.parametrize("argv", [
    ["extract", "--out", "{full}/data", "--model", "tiny:llama", "--device", "cpu", "--docs", "40"],
    ["init", "--data", "data", "--out", "{full}/bundle"],
], ids=["extract", "init"])
def test_full_disk_is_one_line_and_leaves_no_temp_files(argv: list[str], world: Path, tmp_path: Path) -> None:
    w = Path(shutil.copytree(world, tmp_path / "w"))
    before = snapshot(w)
    with mounted(tmp_path, "size=48k") as full:
        preexec = None
        if full is None:  # no tmpfs: a per-process file-size limit fails writes the same way
            full, preexec = tmp_path / "full", _limit_file_size
            full.mkdir()
        line = assert_one_line_error(run_cli([a.format(full=full) for a in argv], w, preexec), str(full))
        assert os.strerror(errno.ENOSPC) in line or os.strerror(errno.EFBIG) in line, line
        leftovers = sorted(p.name for p in full.iterdir())
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers
    assert snapshot(w) == before


# ---------------------------------------------------------------- degenerate vectors
def test_degenerate_vectors_give_the_direction_or_one_clear_error(world: Path, tmp_path: Path) -> None:
    """Only the direction matters (docs/design.md §6): a vector of norm ~1e-30 or ~1e30 gets the
    metrics and the explanation of its direction; an all-zero vector is refused with one line,
    by the library, the CLI and (see test_serve.py) the server alike."""
    import torch
    from safetensors.torch import save_file

    from nla import metrics
    from nla.errors import NLAError

    torch.manual_seed(0)
    v = torch.randn(3, 64)
    mean = torch.randn(64)
    for scale in (1e-30, 1e30):
        assert torch.allclose(metrics.cosine(v * scale, v), torch.ones(3), atol=1e-6)
        assert torch.allclose(metrics.mse_nrm(v * scale, v), torch.zeros(3), atol=1e-6)
        assert metrics.fve_nrm(v * scale, v, mean) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(metrics.cosine(torch.zeros(1, 64), v[:1]), torch.zeros(1))  # finite, not NaN

    nla = NLA.from_pretrained(world / "run")
    said = [o[0].raw for o in nla.verbalize(v, max_new_tokens=6)]
    assert [o[0].raw for o in nla.verbalize(v * 1e-30, max_new_tokens=6)] == said
    assert [o[0].raw for o in nla.verbalize(v * 1e30, max_new_tokens=6)] == said
    with pytest.raises(NLAError, match="all zeros"):
        nla.verbalize(torch.zeros(1, 64))

    w = Path(shutil.copytree(world, tmp_path / "w"))
    save_file({"v": torch.zeros(2, 64)}, str(w / "zero.safetensors"))
    assert_one_line_error(run_cli(["verbalize", "--nla", "run", "--vectors", "zero.safetensors", "--device", "cpu"],
                                  w), "all zeros")
