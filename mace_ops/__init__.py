"""MACE (Mass Concept Erasure) algorithms in plain torch.

This package never imports ComfyUI. It works on the small interfaces in ``interfaces.py``
(named K/V weights, a text encoder, a denoiser whose cross-attention can be read), so the same
code serves SD1.x, SD2.x, SDXL and the toy world in ``toyworld``.

Stages: ``cfr`` (closed-form cross-attention refinement), ``lora_train`` (per-concept LoRA with an
attention loss and CFIS), ``fusion`` (closed-form multi-LoRA fusion); ``erasure_file`` saves and
loads the result as a small safetensors patch.
"""

__version__ = "0.1.0"
