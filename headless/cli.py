"""Command line: run, lint and convert ComfyUI workflows headlessly, with this pack loaded.

    python -m comfyui_mace run WORKFLOW.json [--set NODE.FIELD=VALUE ...] [--comfyui PATH]
                                             [--output-directory DIR] [--extra-model-dir KIND=DIR]
    python path/to/comfyui-mace check WORKFLOW.json [--validate]
    python path/to/comfyui-mace convert WORKFLOW.json [-o API.json] [--set ...]
    python path/to/comfyui-mace technique --config CFG.json|yaml   # eval-unlearn "mace" config

WORKFLOW.json is either the UI format (what the frontend saves; converted like the frontend
queues it) or the API format (``{node_id: {"class_type", "inputs"}}``, or a ``/prompt`` body).
``--set NODE.FIELD=VALUE``: NODE is a node id, else a node title, else a class_type (each only
when unique); FIELD is an input name; VALUE is parsed as JSON when it parses (``20``, ``7.5``,
``true``, ``["4", 0]`` for a link), else taken as text (text and option inputs always get the
text).  ``run`` executes through ComfyUI's own ``execution.PromptExecutor`` with a console stub
server, prints progress and where the outputs went, and exits 1 with the exception text when
the workflow fails.  Exit status 2: usage errors, or ComfyUI not found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import bootstrap as _bootstrap
from .ui_to_api import (check_api_prompt, check_ui_workflow, load_workflow, node_input_types,
                        ui_workflow_to_api)


class UsageError(Exception):
    """A command-line mistake (bad --set, unreadable workflow); exit status 2."""


# --------------------------------------------------------------------------------------------
# --set NODE.FIELD=VALUE
# --------------------------------------------------------------------------------------------

def parse_set(text: str) -> tuple[str, str, str]:
    key, sep, raw = text.partition("=")
    node, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise UsageError(f"--set {text!r}: expected NODE.FIELD=VALUE (NODE: node id, title or "
                         f"class_type; FIELD: input name), e.g. --set KSampler.steps=20")
    return node, name, raw


def _node_label(nid: str, node: Mapping) -> str:
    title = (node.get("_meta") or {}).get("title")
    cls = node.get("class_type", "?")
    return f"{nid} ({cls}" + (f", title {title!r}" if title and title != cls else "") + ")"


def find_node(prompt: Mapping[str, Mapping], key: str) -> str:
    """Node id for ``key``: an id, else a unique title, else a unique class_type."""
    if key in prompt:
        return key
    for what, get in (("title", lambda n: (n.get("_meta") or {}).get("title")),
                      ("class_type", lambda n: n.get("class_type"))):
        hits = [nid for nid, n in prompt.items() if get(n) == key]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"--set: {what} {key!r} matches {len(hits)} nodes ("
                             + ", ".join(_node_label(h, prompt[h]) for h in hits)
                             + "); use the node id")
    raise UsageError(f"--set: no node {key!r} (use a node id, title or class_type); the nodes: "
                     + ", ".join(_node_label(nid, n) for nid, n in prompt.items()))


def parse_value(raw: str, declared: str | None = None) -> Any:
    """JSON when it parses, else the text; text/option inputs keep the text unless it is a JSON
    string."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if declared in ("STRING", "COMBO") and not isinstance(value, str):
        return raw
    if declared == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if declared == "INT" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _declared_inputs(class_type: str, node_info) -> dict[str, str]:
    try:
        return node_input_types(class_type, node_info)
    except RuntimeError:  # ComfyUI not imported and no node_info: only the prompt's own inputs
        return {}


def apply_overrides(prompt: dict, sets: Iterable[str], node_info=None) -> list[tuple[str, str, Any]]:
    """Apply ``--set`` items to an API prompt in place; returns ``[(node_id, field, value)]``.
    Raises :class:`UsageError` naming the node/field and listing the valid ones."""
    done = []
    for text in sets or ():
        key, name, raw = parse_set(text)
        nid = find_node(prompt, key)
        node = prompt[nid]
        inputs = node.setdefault("inputs", {})
        declared = _declared_inputs(node.get("class_type"), node_info)
        valid = list(declared) + [k for k in inputs if k not in declared]
        if name not in valid:
            raise UsageError(f"--set {text!r}: node {_node_label(nid, node)} has no input "
                             f"{name!r}; its inputs: " + (", ".join(valid) or "(none)"))
        value = parse_value(raw, declared.get(name))
        inputs[name] = value
        done.append((nid, name, value))
    return done


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ComfyUI")
    g.add_argument("--comfyui", metavar="PATH",
                   help="ComfyUI checkout (default: $COMFYUI_PATH, else the ComfyUI this pack is "
                        "installed in, else ~/ComfyUI)")
    g.add_argument("--base-directory", metavar="DIR",
                   help="ComfyUI base directory (models/, output/, input/, temp/, custom_nodes/)")
    g.add_argument("--output-directory", metavar="DIR", help="where output nodes write files")
    g.add_argument("--extra-model-dir", action="append", default=[], metavar="KIND=DIR",
                   help="extra model folder, e.g. checkpoints=/data/sd (repeatable)")
    g.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                   help="ComfyUI extra_model_paths.yaml-style file (repeatable)")
    g.add_argument("--no-custom-nodes", action="store_true",
                   help="load only this pack, not the other custom nodes of the ComfyUI install")
    g.add_argument("--cpu", action="store_true", default=None,
                   help="run on the CPU even when a GPU is available")
    g.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's INFO log")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="comfyui_mace", description="Run, lint and convert ComfyUI workflows headlessly "
        "with the comfyui-mace nodes loaded.",
        epilog="Exit status: 0 ok, 1 the workflow failed / has problems, 2 usage error or "
        "ComfyUI not found.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{run,check,convert,technique}")
    run = sub.add_parser("run", help="execute a workflow (UI or API JSON)")
    run.add_argument("workflow", help="workflow JSON (UI or API format)")
    run.add_argument("--set", action="append", default=[], metavar="NODE.FIELD=VALUE",
                     help="override an input (repeatable)")
    run.add_argument("--save-api", metavar="PATH", help="also write the final API prompt here")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _common(run)
    check = sub.add_parser("check", help="lint a workflow against the installed node definitions")
    check.add_argument("workflow", nargs="+", help="workflow JSON files")
    check.add_argument("--validate", action="store_true",
                       help="also run ComfyUI's prompt validation (values, model files present)")
    _common(check)
    conv = sub.add_parser("convert", help="UI workflow -> API prompt JSON")
    conv.add_argument("workflow")
    conv.add_argument("-o", "--output", metavar="PATH", help="write here (default: stdout)")
    conv.add_argument("--set", action="append", default=[], metavar="NODE.FIELD=VALUE")
    _common(conv)
    tech = sub.add_parser("technique", help="run an eval-learn/eval-unlearn 'mace' technique config "
                          "(erase, save/load the diffusers-key UNet .pt)")
    tech.add_argument("--config", required=True, metavar="CFG", help="JSON or YAML config")
    tech.add_argument("--validate-only", action="store_true", help="check the config and stop")
    tech.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    _common(tech)
    return ap


def _err(msg: str) -> None:
    sys.stderr.write(msg.rstrip("\n") + "\n")
    sys.stderr.flush()


def _start(args) -> _bootstrap.ComfyEnv:
    env = _bootstrap.bootstrap(
        args.comfyui, base_directory=args.base_directory, output_directory=args.output_directory,
        extra_model_dirs=_bootstrap.parse_model_dirs(args.extra_model_dir),
        extra_model_paths_config=args.extra_model_paths_config,
        custom_nodes="pack" if args.no_custom_nodes else "all",
        cpu=True if args.cpu else None, verbose=args.verbose)
    _err(f"ComfyUI {env.version} at {env.comfy_root} (device: {env.device}); comfyui-mace "
         f"nodes: {', '.join(env.pack_node_ids) or 'none'}")
    if env.other_copy_in_use:
        _err(f"comfyui-mace: this run uses the copy installed at {env.nodes_dir} (ComfyUI "
             f"registered its nodes first), NOT {env.pack_dir}; to run this copy instead, add "
             f"--no-custom-nodes")
    else:
        _err(f"comfyui-mace: using the copy at {env.nodes_dir or env.pack_dir}")
    return env


def _read(path: str) -> tuple[str, dict]:
    try:
        return load_workflow(Path(path))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path}: {exc}") from exc


def _write(path: str, text: str, what: str) -> None:
    """Write a file the operator named (``-o``, ``--save-api``), making missing folders; UsageError otherwise."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write ({exc.strerror or exc}); choose a writable path") from None


def _to_api(kind: str, data: dict, path: str) -> dict:
    if kind == "api":
        return data
    problems = check_ui_workflow(data)
    for p in problems:
        _err(f"warning: {path}: {p}")
    return ui_workflow_to_api(data)


def cmd_run(args) -> int:
    from .runner import PromptInvalid, output_files, run_prompt

    kind, data = _read(args.workflow)
    env = _start(args)
    try:
        prompt = _to_api(kind, data, args.workflow)
    except KeyError as exc:
        _err(f"error: {args.workflow}: {exc.args[0] if exc.args else exc}")
        return 1
    for nid, name, value in apply_overrides(prompt, args.set):
        _err(f"set node {_node_label(nid, prompt[nid])} {name} = {json.dumps(value)}")
    if args.save_api:
        _write(args.save_api, json.dumps(prompt, indent=1) + "\n", "--save-api")
    try:
        res = run_prompt(prompt, quiet=args.quiet)
    except PromptInvalid as exc:
        _err(f"error: {args.workflow}: {exc}")
        return 1
    if not res.success:
        _err(f"error: {args.workflow} failed after {res.seconds:.1f}s: "
             f"{res.error if args.verbose else res.error_summary}")
        return 1
    rows = output_files(res.history)
    print(f"finished {args.workflow} in {res.seconds:.1f}s")
    if rows:
        print("outputs:")
        for nid, what in rows:
            print(f"  {_node_label(nid, prompt.get(nid, {}))}: {what}")
    print(f"output folder: {env.output_dir}")
    return 0


def cmd_check(args) -> int:
    from .runner import PromptInvalid, validate

    loaded = [(p, _read(p)) for p in args.workflow]
    _start(args)
    bad = 0
    for path, (kind, data) in loaded:
        problems = check_ui_workflow(data) if kind == "ui" else check_api_prompt(data)
        prompt = None
        if not problems:
            try:
                prompt = ui_workflow_to_api(data) if kind == "ui" else data
            except KeyError as exc:
                problems.append(str(exc.args[0] if exc.args else exc))
        if prompt is not None and args.validate:
            try:
                validate(prompt)
            except PromptInvalid as exc:
                problems.append(str(exc))
        if problems:
            bad += 1
            print(f"{path}: {len(problems)} problem(s) ({kind} format)")
            for p in problems:
                print(f"  {p}")
        else:
            n = len(prompt or {})
            print(f"{path}: OK ({kind} format, {n} executable node(s)"
                  + (", validated" if args.validate else "") + ")")
    return 1 if bad else 0


def cmd_convert(args) -> int:
    kind, data = _read(args.workflow)
    _start(args)
    try:
        prompt = _to_api(kind, data, args.workflow)
    except KeyError as exc:
        _err(f"error: {args.workflow}: {exc.args[0] if exc.args else exc}")
        return 1
    apply_overrides(prompt, args.set)
    text = json.dumps(prompt, indent=1) + "\n"
    if args.output:
        _write(args.output, text, "-o")
        _err(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_technique(args) -> int:
    from .technique import ConfigError, load_config_file, run_technique, validate_config

    try:
        data = load_config_file(args.config)
        tc = validate_config(data, base_dir=os.getcwd())
    except ConfigError as exc:
        _err(f"error: {exc}")
        return 2
    if args.validate_only:
        print(f"{args.config}: OK")
        return 0
    if args.output_directory:
        _err("note: --output-directory is ignored; the config's output_dir is used")
    try:
        report = run_technique(tc, args.comfyui, quiet=args.quiet,
                               custom_nodes="pack" if args.no_custom_nodes else "all", verbose=args.verbose)
    except ConfigError as exc:
        _err(f"error: {exc}")
        return 2
    except RuntimeError as exc:
        _err(f"error: {exc}")
        return 1
    print(f"erasure file: {report['erasure_file']}")
    if report.get("save_path"):
        print(f"UNet .pt (diffusers keys): {report['save_path']}")
    print(f"report: {os.path.join(tc.output_dir, 'technique_run.json')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if _bootstrap.get_env() is None and args.command != "technique":  # technique: config errors first
            _bootstrap.find_comfyui(args.comfyui)  # fail fast, before reading anything
        return {"run": cmd_run, "check": cmd_check, "convert": cmd_convert,
                "technique": cmd_technique}[args.command](args)
    except _bootstrap.ComfyUINotFound as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (UsageError, ValueError, RuntimeError) as exc:
        # usage mistakes; bootstrap problems (shadowed modules, the pack failed to load)
        if args.verbose:
            import traceback

            traceback.print_exc()
        _err(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
