"""Node ``MACE Erasure Check``: did the erasure work? Measured with the models already in the graph.

Both models sample the same prompts (``sample_latents``: KSampler path, image i uses seed + i):
erased prompts (the words the erasure was fitted on), held-out words (nicknames it never saw)
and kept concepts, from the concept type's templates (``mace_ops.erasure_check.check_prompts``).
Every image is judged by the *base* model as a zero-shot diffusion classifier
(``mace_ops.diffusion_classifier``) among the anchor, the erased, kept and extra concepts, each
filled into the image's own template; it works on the latents, so no decode is needed except for
the worst cases shown. Outputs: the table (Acc_e, Acc_g, Acc_s, H with binomial SEs and n, before
and after), a labelled grid of the worst cases (the erased / held-out images the judge still
recognises most surely, the kept images it recognises least), and a JSON under
``<output>/mace_checks/`` with rows in ``bench/mass_quality.py``'s schema and every image's
verdict. The judge sees no pooled text: SDXL's ``y`` is zeros (unmeasured there).

Optional second judge (``clip_vision``): every image is also decoded and classified by CLIP
zero-shot among the same candidate prompts (``mace_ops.clip_judge``; the encoders and their checks
in ``comfy_clip_judge``): the table and the JSON add its Acc_e / Acc_g / Acc_s / H and the
per-image agreement of the two judges. JSON rows carry ``judge``: "diffusion" or "clip".
"""
from __future__ import annotations

from functools import partial
import json
import os
import time

import torch

import folder_paths
from . import presets
from .comfy_compat import advanced, io

from ..mace_ops.atomic_write import write_bytes_atomic
from ..mace_ops.concepts import check_disjoint, normalise_phrase, parse_concepts, require_concepts
from ..mace_ops.clip_judge import ALIGNED_BELOW, agreement, clip_classify
from ..mace_ops.diffusion_classifier import JudgeConfig, classify
from ..mace_ops.erasure_check import candidates, check_prompts, check_rows, judge_table, parse_held_out, report
from ..mace_ops.templates import DEFAULT_ANCHORS, templates_for
from .comfy_clip_judge import ClipJudgeEncoders
from .comfy_denoiser import ComfyDenoiser
from .comfy_text_encoder import ComfyTextEncoder
from .concept_inputs import concept_inputs
from .preview_nodes import compose_grid
from .progress import NodeProgress
from .sampling_inputs import sampling_inputs
from .training_images_node import decode_latents, default_sampler, sample_latents
from .validation import check_inputs, require_clip_vae

WORST = 4            # worst cases per kind in the grid
JSON_PREFIX = "mace_checks/erasure_check"


def _judged(cands, winner: int, p: float) -> str:
    return f"judged {cands[winner] or '(anchor)'!r}, p {p:.2f}"


def _num(x: float, digits: int = 4):
    """A JSON-safe float (None for inf/nan)."""
    x = float(x)
    return round(x, digits) if x == x and abs(x) != float("inf") else None


def worst_cases(prompts, judgement, k: int = WORST) -> list[int]:
    """Erased/held-out images the judge still recognises (highest margin first), then kept images it
    recognises least (lowest margin first): ``k`` of each, recognised or not."""
    margin = judgement.margin.tolist()
    gone = sorted((i for i, p in enumerate(prompts) if p.set != "kept"), key=lambda i: -margin[i])[:k]
    kept = sorted((i for i, p in enumerate(prompts) if p.set == "kept"), key=lambda i: margin[i])[:k]
    return gone + kept


def save_json(payload: dict) -> str:
    folder, name, counter, _sub, _prefix = folder_paths.get_save_image_path(JSON_PREFIX,
                                                                            folder_paths.get_output_directory())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}_{counter:05}_.json")
    write_bytes_atomic(path, json.dumps(payload, indent=1).encode("utf-8"))
    return path


NODE_ID = "MaceErasureCheck"
_default = partial(presets.default, NODE_ID)


class MaceErasureCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        shared = concept_inputs(concepts_tooltip="The erased concepts, one per line; synonyms (also erased) "
                                "separated by commas.", type_tooltip="Chooses the prompt templates: style, person, "
                                "object (as the erasure used).",
                                anchor_tooltip="What the erased concepts were mapped to; empty = the type's "
                                "default ('a person', 'art', nothing for objects). The judge's first candidate. "
                                "Applies under every preset.")
        sampling = sampling_inputs(default_sampler(), _default("scheduler"), steps=_default("steps"), cfg=_default("cfg"), expert=True)
        return io.Schema(
            node_id="MaceErasureCheck",
            display_name="MACE Erasure Check",
            category="MACE",
            description="Measures an erasure with the models in the graph: both models sample erased, held-out "
            "(nicknames) and kept prompts, and the base model judges every image as a diffusion classifier, giving "
            "Acc_e / Acc_g / Acc_s / H with standard errors before and after, a grid of the worst cases and a JSON "
            "under output/mace_checks. Use it after any erasure to see whether the concept is gone and the "
            "look-alikes are kept, before you share the result. Connect a CLIP vision model to add CLIP zero-shot "
            "as a second judge.",
            inputs=[
                io.Model.Input("base_model", tooltip="The model before erasure: it samples the 'before' images and "
                               "judges every image."),
                io.Clip.Input("clip", tooltip="The base model's CLIP."),
                io.Model.Input("erased_model", tooltip="The model after erasure (same architecture)."),
                io.Vae.Input("vae", tooltip="Decodes only the worst cases for the grid."),
                shared["concepts"],
                io.String.Input("held_out", multiline=True, default="",
                                tooltip="Optional words the erasure was not fitted on (nicknames, paraphrases), "
                                "one line per concept: 'word, word -> erased concept' ('-> ...' may be left out "
                                "with one erased concept). Empty: no Acc_g."),
                io.String.Input("keep", multiline=True, default="claude monet\npablo picasso",
                                tooltip="Concepts that should survive (the look-alikes you care about), one per "
                                "line; 2-10."),
                shared["concept_type"],
                advanced(shared["anchor"]),
                advanced(io.Int.Input("images_per_set", default=_default("images_per_set"), min=1, max=1000,
                                      tooltip="Images per set (erased, held-out, kept), for each model; 12 gives "
                                      "SEs up to 0.14, 50 up to 0.07 (cost grows linearly).")),
                advanced(io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                      tooltip="Image i of a set uses seed + i (both models); the judge's draws too. "
                                      "Applies under every preset.")),
                *sampling,
                advanced(io.Int.Input("draws", default=_default("draws"), min=1, max=256,
                                      tooltip="The judge's shared (t, noise) draws per image, t in the high-noise "
                                      "half: more = surer verdicts, cost grows with it; 4-32.")),
                advanced(io.String.Input("other_candidates", multiline=True, default="",
                                         tooltip="Optional look-alikes the images might drift to, one per line: the "
                                         "judge may answer them (nothing is sampled from them). Applies under every "
                                         "preset.")),
                io.Clip.Input("erased_clip", optional=True,
                              tooltip="The erased model's CLIP when the erasure changed it (MACE Text Gate); "
                              "default: clip."),
                advanced(io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional second judge: a CLIP vision model (stock Load CLIP Vision) of "
                                    "the same CLIP as the checkpoint's text tower: ViT-L/14 for SD1.x, ViT-H/14 for "
                                    "SD2.x, ViT-bigG/14 for SDXL. Every image is then decoded and also classified by "
                                    "CLIP zero-shot among the same candidates; the table and JSON add its Acc_e / "
                                    "Acc_g / Acc_s / H and its per-image agreement with the diffusion judge. SD1.x "
                                    "checkpoints carry no text projection: connect as clip the text encoder loaded "
                                    "from a file that has one (stock Load CLIP). Cost: a VAE decode and a vision "
                                    "forward per image.")),
                presets.preset_input(NODE_ID),
            ],
            outputs=[io.String.Output(display_name="table", tooltip="Acc_e / Acc_g / Acc_s / H before and after, "
                                      "with SEs and n, then every setting used."),
                     io.Image.Output(display_name="worst_cases", tooltip="Labelled before/after grid of the images "
                                     "the erasure handled worst."),
                     io.String.Output(display_name="json_path", tooltip="The JSON with every image's verdict.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base_model, clip, erased_model, vae, concepts, held_out, keep, concept_type, anchor,
                images_per_set, seed, steps, cfg, width, height, sampler_name, scheduler, draws,
                other_candidates="", erased_clip=None, clip_vision=None, preset=presets.CUSTOM) -> io.NodeOutput:
        check_inputs(cls, locals())
        tuned = presets.resolve(NODE_ID, preset, dict(locals()))
        images_per_set, steps, cfg, draws = tuned["images_per_set"], tuned["steps"], tuned["cfg"], tuned["draws"]
        sampler_name, scheduler = tuned["sampler_name"], tuned["scheduler"]
        settings_line = presets.settings_text(tuned, {"concept_type": concept_type, "anchor": anchor,
                                                      "seed": int(seed), "width": int(width), "height": int(height)})
        start = time.perf_counter()
        require_clip_vae(clip, vae)
        if base_model is None or erased_model is None:
            raise ValueError("base_model/erased_model: connect both MODELs")
        templates = templates_for(concept_type)
        erased = require_concepts(parse_concepts(concepts, "concepts", allow_anchor=False), "concepts")
        kept = require_concepts(parse_concepts(keep, "keep", allow_anchor=False), "keep")
        check_disjoint(erased, kept, "concepts", "keep")
        extra = parse_concepts(other_candidates, "other_candidates", allow_anchor=False)
        held = parse_held_out(held_out, erased)
        anchor_text = normalise_phrase(anchor) or DEFAULT_ANCHORS.get(concept_type, "")
        cands = candidates(anchor_text, erased, kept, extra)
        if anchor_text in cands[1:]:
            raise ValueError(f"anchor: {anchor_text!r} is also a listed concept; the anchor must be another phrase")
        prompts = check_prompts(erased, held, kept, templates, int(images_per_set))
        texts = [p.prompt for p in prompts]
        config = JudgeConfig(draws=int(draws), screen_draws=min(2, int(draws)), seed=int(seed), batch=8)
        second = ClipJudgeEncoders(clip, clip_vision) if clip_vision is not None else None  # refused before sampling
        sample_units = 2 * len(texts) * int(steps)
        n_judge = 2 * len(texts) * len(cands) * int(draws)
        n_clip = (2 * len(texts) + 1) * int(steps) if second is not None else 0  # a decode + forward ~ a step
        total = sample_units + n_judge + n_clip
        bar = NodeProgress(total)
        args = (int(steps), float(cfg), int(seed), int(width), int(height), sampler_name, scheduler, "")
        latents, seconds = {}, {}
        for i, (name, model, enc) in enumerate((("none", base_model, clip), ("erased", erased_model,
                                                                              erased_clip or clip))):
            t0 = time.perf_counter()
            latents[name] = sample_latents(model, enc, texts, *args,
                                           progress=lambda d, t, i=i: bar(i * t + d, total))
            seconds[f"sampling ({name})"] = (time.perf_counter() - t0) / len(texts)
        unique, table, labels = judge_table([p.template for p in prompts], [p.label for p in prompts], cands)
        contexts = torch.stack([e.features for e in ComfyTextEncoder(clip).encode(unique)])
        denoiser = ComfyDenoiser(base_model, backward=False, prediction="eps")
        judged = {}
        try:
            to_model = base_model.model.process_latent_in
            x0 = torch.cat([to_model(latents["none"]), to_model(latents["erased"])]).to(denoiser.device)
            t0 = time.perf_counter()
            both = classify(denoiser, x0, contexts, torch.cat([table, table]), torch.cat([labels, labels]), config,
                            keep=(0,), progress=lambda d, t: bar(sample_units + d * n_judge // max(t, 1), total),
                            draw_ids=list(range(len(texts))) * 2)
            seconds["judging"] = (time.perf_counter() - t0) / (2 * len(texts))
        finally:
            denoiser.release()
        n = len(texts)
        for j, name in enumerate(("none", "erased")):
            judged[name] = both.select(slice(j * n, (j + 1) * n))
        clip_judged, clip_rows, agree, clip_section, clip_settings = {}, [], {}, None, None
        if second is not None:
            t0 = time.perf_counter()
            start_units = sample_units + n_judge
            both_clip = clip_classify(
                2 * n, second.image_encoder(vae, torch.cat([latents["none"], latents["erased"]])), second.encode_texts,
                unique, torch.cat([table, table]), torch.cat([labels, labels]), batch=8,
                progress=lambda d, t: bar(start_units + d * n_clip // max(t, 1), total))
            seconds["clip judging"] = (time.perf_counter() - t0) / (2 * n)
            for j, name in enumerate(("none", "erased")):
                clip_judged[name] = both_clip.select(slice(j * n, (j + 1) * n))
        extra_info = {"judge": "diffusion", "candidates": len(cands), "draws": int(draws),
                      "seconds": round(time.perf_counter() - start, 2), "peak_mb": None}
        rows = check_rows(concept_type, len(erased), prompts, {k: v.recognised for k, v in judged.items()},
                          **extra_info)
        if second is not None:
            clip_rows = check_rows(concept_type, len(erased), prompts, {k: v.recognised for k, v in clip_judged.items()},
                                   judge="clip", candidates=len(cands), seconds=extra_info["seconds"], peak_mb=None)
            for k in ("none", "erased"):
                agree[k] = {"verdict": _num(agreement(judged[k].recognised, clip_judged[k].recognised)),
                            "answer": _num(agreement(judged[k].winner, clip_judged[k].winner)), "n": n}
            best = {k: float(v.best_cosine.mean()) for k, v in clip_judged.items()}
            aligned = min(best.values()) >= ALIGNED_BELOW
            notes = [f"judges agree (same verdict per image): before {agree['none']['verdict']:.0%}, after "
                     f"{agree['erased']['verdict']:.0%} (n={n} each); same answer {agree['none']['answer']:.0%}, "
                     f"{agree['erased']['answer']:.0%}",
                     f"mean best cosine: before {best['none']:.3f}, after {best['erased']:.3f}"
                     + ("" if aligned else f" -- below {ALIGNED_BELOW}: the vision model and the text tower do not "
                        "look like one CLIP (projection missing or wrong vision model?); do not trust the CLIP judge")]
            if second.note:
                notes.append(second.note)
            clip_section = {"title": f"CLIP judge (zero-shot, {second.tower_name} text tower + clip_vision, "
                                     f"{second.width}-wide embeddings)", "rows": clip_rows, "notes": notes}
            clip_settings = {"text_tower": second.tower_name, "width": second.width, "image_size": second.image_size,
                             "projection_used_by_comfyui": second.projected_by_comfy,
                             "mean_best_cosine": {k: _num(v) for k, v in best.items()}, "aligned_hint": aligned}
        close = {k: float(((v.p_label > 0.1) & (v.p_label < 0.9)).double().mean()) for k, v in judged.items()}
        table_text = report(rows, {"before": close["none"], "after": close["erased"]}, seconds,
                            second=clip_section) + "\n" + settings_line
        worst = worst_cases(prompts, judged["erased"])
        grid_rows = [(f"{prompts[i].set} ({prompts[i].label}), after: "
                      f"{_judged(cands, int(judged['erased'].winner[i]), float(judged['erased'].p_label[i]))}"
                      + (f"; CLIP {cands[int(clip_judged['erased'].winner[i])] or '(anchor)'!r}" if clip_judged else ""),
                      prompts[i].prompt) for i in worst]
        before = decode_latents(vae, latents["none"][worst])
        after = decode_latents(vae, latents["erased"][worst])
        grid = compose_grid(grid_rows, before, after)
        payload = {"bench": "erasure_check", "settings": {"preset": tuned.preset, "concept_type": concept_type, "anchor": anchor_text,
                   "images_per_set": int(images_per_set), "seed": int(seed), "steps": int(steps), "cfg": float(cfg),
                   "width": int(width), "height": int(height), "sampler": sampler_name, "scheduler": scheduler,
                   "judge": {"draws": config.draws, "t_range": [config.t_low, config.t_high],
                             "shortlist": config.shortlist, "screen_draws": config.screen_draws,
                             "bootstrap": config.bootstrap},
                   "clip_judge": clip_settings},
                   "candidates": cands, "rows": rows + clip_rows, "seconds_per_image": seconds,
                   **({"agreement": agree} if agree else {}),
                   "images": [{"set": p.set, "prompt": p.prompt, "label": p.label,
                               **{f"judged_{k}": cands[int(v.winner[i])] for k, v in judged.items()},
                               **{f"p_label_{k}": round(float(v.p_label[i]), 3) for k, v in judged.items()},
                               **{f"margin_{k}": float(v.margin[i]) for k, v in judged.items()},
                               **{f"clip_judged_{k}": cands[int(v.winner[i])] for k, v in clip_judged.items()},
                               **{f"clip_margin_{k}": _num(v.margin[i]) for k, v in clip_judged.items()}}
                              for i, p in enumerate(prompts)]}
        path = save_json(payload)
        return io.NodeOutput(table_text, grid, path, ui={"text": [table_text + "\n" + path]})

