"""Validate and execute an API-format prompt with ComfyUI's own ``execution.PromptExecutor``,
reporting to a console stub server instead of the websocket server.

Needs :func:`.bootstrap.bootstrap` first.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, TextIO

from .bootstrap import set_progress_server
from .executor_compat import make_executor


class PromptInvalid(Exception):
    """``execution.validate_prompt`` refused the prompt; the message lists the node errors."""


class ConsoleServer:
    """The parts of ``server.PromptServer`` that the executor, the progress handlers and nodes
    touch.  Every event is kept in :attr:`messages`; progress is printed to ``stream``."""

    def __init__(self, prompt: Mapping | None = None, stream: TextIO | None = None,
                 quiet: bool = False) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self.prompt = dict(prompt or {})
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_line = False
        self._started: dict[str, float] = {}

    # --- PromptServer API -------------------------------------------------------------
    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        if not self.quiet:
            self._print(event, data)

    async def send(self, event, data, sid=None):
        self.send_sync(event, data, sid)

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}))
        if not self.quiet:
            self._line(f"  {self.describe(node_id)}: {text}")

    def queue_updated(self):
        pass

    # --- printing ---------------------------------------------------------------------
    def describe(self, node_id) -> str:
        node = self.prompt.get(str(node_id)) or {}
        title = (node.get("_meta") or {}).get("title")
        cls = node.get("class_type", "?")
        return f"node {node_id} ({cls}{', ' + repr(title) if title and title != cls else ''})"

    def _line(self, text: str, transient: bool = False) -> None:
        if self._open_line:
            self.stream.write("\n" if not transient else "\r")
        self.stream.write(text)
        if transient and self._tty:
            self._open_line = True
        else:
            self.stream.write("\n")
            self._open_line = False
        self.stream.flush()

    def _print(self, event, data) -> None:
        data = data if isinstance(data, Mapping) else {}
        if event == "execution_cached" and data.get("nodes"):
            self._line(f"cached: {', '.join(str(n) for n in data['nodes'])}")
        elif event == "executing" and data.get("node") is not None:
            self._started[str(data["node"])] = time.perf_counter()
            self._line(f"running {self.describe(data['node'])}")
        elif event == "executed" and data.get("node") is not None:
            t0 = self._started.get(str(data["node"]))
            took = f" in {time.perf_counter() - t0:.1f}s" if t0 else ""
            self._line(f"done {self.describe(data['node'])}{took}")
        elif event == "progress":
            value, total = data.get("value"), data.get("max")
            if not isinstance(value, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
                return
            every = max(1, int(total) // 10)
            if self._tty or value >= total or int(value) % every == 0:
                self._line(f"  {self.describe(data.get('node'))}: {int(value)}/{int(total)}",
                           transient=value < total)
        elif event == "execution_interrupted":
            self._line(f"interrupted in {self.describe(data.get('node_id'))}")


@dataclass
class RunResult:
    success: bool
    prompt_id: str
    history: dict
    messages: list = field(default_factory=list)
    error: str | None = None
    """The exception(s) with tracebacks, when it failed."""
    error_summary: str | None = None
    """One line per failure: node, exception type and message."""
    seconds: float = 0.0
    executor: Any = None


def format_node_errors(err, node_errors, prompt: Mapping | None = None) -> str:
    lines = []
    if isinstance(err, Mapping):
        msg = err.get("message", "")
        det = err.get("details", "")
        lines.append(f"prompt invalid: {msg}{': ' + str(det) if det else ''}")
    else:
        lines.append(f"prompt invalid: {err}")
    for nid, ne in (node_errors or {}).items():
        cls = ne.get("class_type") or ((prompt or {}).get(str(nid)) or {}).get("class_type")
        for e in ne.get("errors", []):
            extra = e.get("extra_info") or {}
            name = extra.get("input_name")
            lines.append(f"  node {nid} ({cls})" + (f" input {name!r}" if name else "")
                         + f": {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def validate(prompt: Mapping, prompt_id: str | None = None):
    """ComfyUI's ``validate_prompt``: returns the output node ids to execute, or raises
    :class:`PromptInvalid`."""
    import execution

    pid = prompt_id or str(uuid.uuid4())
    res = asyncio.run(execution.validate_prompt(pid, dict(prompt), None))
    ok, err, outputs, node_errors = res[0], res[1], res[2], res[3]
    if not ok:
        raise PromptInvalid(format_node_errors(err, node_errors, prompt))
    return outputs


def run_prompt(api_prompt: Mapping, *, server: ConsoleServer | None = None, quiet: bool = False,
               cache_type: str = "classic", prompt_id: str | None = None,
               extra_data: Mapping | None = None) -> RunResult:
    """Validate (raises :class:`PromptInvalid`) and execute an API prompt in this process."""
    import server as comfy_server

    prompt = {str(k): copy.deepcopy(dict(v)) for k, v in api_prompt.items()}
    pid = prompt_id or str(uuid.uuid4())
    outputs = validate(prompt, pid)
    srv = server or ConsoleServer(prompt, quiet=quiet)
    srv.prompt = prompt
    srv.last_prompt_id = pid
    executor = make_executor(srv, cache_type)
    # A few nodes reach for PromptServer.instance; give them the stub while we run.
    had_instance = hasattr(comfy_server.PromptServer, "instance")
    old_instance = getattr(comfy_server.PromptServer, "instance", None)
    if old_instance is None:
        comfy_server.PromptServer.instance = srv
    set_progress_server(srv)
    data = {"client_id": "comfyui-mace-headless"}
    data.update(extra_data or {})
    t0 = time.perf_counter()
    try:
        executor.execute(prompt, pid, data, outputs)
    finally:
        set_progress_server(None)
        if old_instance is None:
            if had_instance:
                comfy_server.PromptServer.instance = old_instance
            else:
                del comfy_server.PromptServer.instance
    seconds = time.perf_counter() - t0
    events = [e for e, _ in srv.messages]
    success = bool(executor.success) and "execution_success" in events
    history = dict(getattr(executor, "history_result", {}) or {})
    error = summary = None
    if not success:
        parts, lines = [], []
        for ev, d in srv.messages:
            if ev in ("execution_error", "execution_interrupted"):
                head = (f"{ev.replace('execution_', '')} in node {d.get('node_id')} "
                        f"({d.get('node_type')})")
                if ev == "execution_error":
                    head += f": {d.get('exception_type', '')}: {d.get('exception_message', '')}"
                lines.append(head.rstrip())
                parts.append(head + "\n" + "".join(d.get("traceback", []) or []))
        error = "\n".join(parts) or f"no execution_success; events: {events}"
        summary = "\n".join(lines) or error
    return RunResult(success, pid, history, srv.messages, error, summary, seconds, executor)


def output_files(history: Mapping) -> list[tuple[str, str]]:
    """``[(node_id, description)]`` for every output a node reported: files as absolute paths,
    texts (shortened)."""
    import folder_paths

    rows = []
    for nid, ui in (history.get("outputs") or {}).items():
        if not isinstance(ui, Mapping):
            continue
        for key, items in ui.items():
            for item in items if isinstance(items, (list, tuple)) else [items]:
                if isinstance(item, Mapping) and "filename" in item:
                    base = folder_paths.get_directory_by_type(item.get("type", "output")) or ""
                    rows.append((str(nid), os.path.join(base, item.get("subfolder", "") or "",
                                                        item["filename"])))
                elif isinstance(item, str):
                    text = item if len(item) <= 300 else item[:297] + "..."
                    rows.append((str(nid), f"{key}: {text}"))
                elif item is not None and key not in ("animated",):
                    text = json.dumps(item, default=str)
                    rows.append((str(nid), f"{key}: {text[:300]}"))
    return rows
