"""Start a real ComfyUI server with this pack loaded, run API prompts, stop it. Used by the comfyui tests.

The server gets its own temp tree (models, input, output, temp, user) and loads the pack through an
``--extra-model-paths-config`` YAML whose ``custom_nodes`` folder holds the pack the way a user installs it: a real
``git clone`` of this repository (HEAD, with the working tree's uncommitted changes copied over it so the tests see
what is being committed), or, for manual use while editing, a symlink to the repository.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-ReDiFine"
WORKFLOW_DIR = REPO / "example_workflows"
"""The UI workflows ComfyUI serves as templates; their API twins (what the tests run) are in its ``api/`` folder."""


def comfyui_root() -> Path:
    return Path(os.environ.get("COMFYUI_ROOT", os.path.expanduser("~/ComfyUI")))


def comfyui_python() -> Optional[Path]:
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return Path(env)
    return comfyui_root() / "venv" / "bin" / "python"


def unavailable_reason() -> Optional[str]:
    """Why the ComfyUI tests cannot run here (None when they can)."""
    root = comfyui_root()
    if not (root / "main.py").is_file() or not (root / "nodes.py").is_file():
        return f"no ComfyUI checkout at {root} (set COMFYUI_ROOT)"
    py = comfyui_python()
    if py is None or not py.exists():
        return f"no ComfyUI python at {py} (set COMFYUI_PYTHON)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, extra_packs: dict[str, Path] | None = None, workdir: Path | None = None,
                 extra_args: tuple[str, ...] = (), install: str = "clone"):
        self.root = comfyui_root()
        self.extra_args = tuple(extra_args)  # more ComfyUI flags, e.g. ("--bf16-unet",)
        self.tmp = Path(workdir or tempfile.mkdtemp(prefix="redifine_comfy_"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.extra_packs = extra_packs or {}
        for d in ("custom_nodes", "models/checkpoints", "models/loras", "models/diffusers", "input", "output",
                  "temp", "user"):
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        if install not in ("clone", "symlink"):
            raise ValueError(f"install must be 'clone' or 'symlink', got {install!r}")
        self.pack = self.tmp / "custom_nodes" / PACK_FOLDER
        links = dict(self.extra_packs)
        if install == "symlink":
            links[PACK_FOLDER] = REPO
        elif not self.pack.exists():
            clone_pack(self.pack)
        for name, target in links.items():
            link = self.tmp / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        self.yaml = self.tmp / "extra_model_paths.yaml"
        self.yaml.write_text(
            "redifine_test:\n"
            f"    base_path: {self.tmp}\n"
            "    is_default: true\n"
            "    custom_nodes: custom_nodes\n"
            "    checkpoints: models/checkpoints\n"
            "    loras: models/loras\n"
            "    diffusers: models/diffusers\n"
        )
        self.log_path = self.tmp / "comfyui.log"
        settings = self.tmp / "user" / "default" / "comfy.settings.json"  # no first-run template dialog in tests
        settings.parent.mkdir(parents=True, exist_ok=True)
        # The two mouse settings are stored with the values the default navigation mode ("legacy") gives them: left
        # unset, frontend 1.27.10 raises "Cannot read properties of undefined (reading 'id')" on every page load
        # (registering the mode setting sets them before they are registered; Comfy-Org/ComfyUI_frontend#6747).
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                        "LiteGraph.Canvas.MinFontSizeForLOD": 1,
                                        "Comfy.Canvas.LeftMouseClickBehavior": "panning",
                                        "Comfy.Canvas.MouseWheelScroll": "zoom"}))

    @property
    def loras(self) -> Path:
        return self.tmp / "models" / "loras"

    @property
    def output(self) -> Path:
        return self.tmp / "output"

    @property
    def input(self) -> Path:
        return self.tmp / "input"

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=env.get("REDIFINE_COMFY_THREADS", "1"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)
        cmd = [str(comfyui_python()), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(self.yaml), "--output-directory", str(self.tmp / "output"),
               "--input-directory", str(self.tmp / "input"), "--temp-directory", str(self.tmp / "temp"),
               "--user-directory", str(self.tmp / "user"), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--log-stdout", *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        atexit.register(self.stop)  # never leave a server behind, even if the test process is torn down
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log()[-4000:]}")

    def serve(self):
        """Start, hand the server to the caller, and always clean up: a pytest fixture does ``yield from s.serve()``."""
        try:
            yield self.start()
        finally:
            self.cleanup()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- host memory of the server process (Linux /proc) ---
    def memory(self) -> dict[str, int]:
        """The server's current and peak resident set size in bytes: {"rss": VmRSS, "peak": VmHWM}."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
        return fields

    def reset_peak(self) -> bool:
        """Reset the peak RSS (VmHWM) to the current RSS; False where the kernel refuses."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    # --- HTTP ---
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read().decode()
                return r.status, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "{}")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "redifine-tests"})
        if status != 200:
            raise AssertionError(f"/prompt refused the prompt ({status}): {json.dumps(body)[:3000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st.get("status_str") in ("success", "error") or st.get("completed"):
                    return h[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue ``prompt``, wait, and return its history entry; raise with the error message when it failed."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            msgs = [m for m in entry["status"].get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            raise AssertionError(f"prompt failed: {json.dumps(msgs)[:4000]}")
        return entry

    def image_paths(self, entry: dict, node_id: str) -> list[Path]:
        out = []
        for img in entry["outputs"].get(node_id, {}).get("images", []):
            # ComfyUI puts its temp folder (previews) in a "temp" folder inside --temp-directory
            base = {"output": self.tmp / "output", "temp": self.tmp / "temp" / "temp", "input": self.tmp / "input"}[img["type"]]
            out.append(base / img.get("subfolder", "") / img["filename"])
        return out


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def clone_pack(dest: Path) -> None:
    """``git clone`` this repository into ``dest`` (what ComfyUI-Manager does), then copy the working tree's changes
    against HEAD over it: modified and new files (git's ignore rules apply), and deleted files removed."""
    subprocess.run(["git", "clone", "--quiet", "--local", str(REPO), str(dest)], check=True, capture_output=True)
    changed = _git("diff", "--no-renames", "--name-only", "-z", "HEAD").split(b"\0")
    changed += _git("ls-files", "--others", "--exclude-standard", "-z").split(b"\0")
    for rel in {c.decode() for c in changed if c}:
        src, dst = REPO / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif dst.is_file() or dst.is_symlink():
            dst.unlink()


def load_workflow(name: str, api: bool = True) -> dict:
    path = WORKFLOW_DIR / (f"api/{name}.api.json" if api else f"{name}.json")
    return json.loads(path.read_text())


def new_client_id() -> str:
    return uuid.uuid4().hex


if __name__ == "__main__":  # manual use: python tests/comfyui/harness.py  -> a server you can open in a browser
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    s = ComfyServer(extra_packs={"redifine_probe": REPO / "tests" / "comfyui" / "probe_pack"},
                    install="symlink" if "--symlink" in sys.argv else "clone").start()
    print(s.url, s.tmp, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.cleanup()
        sys.exit(0)
