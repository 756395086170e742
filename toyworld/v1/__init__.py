"""Toy text-to-image diffusion world for measuring concept erasure on CPU.

A tiny synthetic world (coloured shapes on grey backgrounds, 32x32 RGB) with a causal text
encoder and a cross-attention UNet, small enough to train in ~40 min on one CPU thread and to
sample in milliseconds per image. It is used to check MACE-style erasure end to end
(efficacy, generality, specificity, H). Plain torch + numpy + safetensors; never imports ComfyUI.

Modules: ``vocab`` (words, tokens, captions), ``data`` (renderer, caption sampling),
``model`` (text encoder + UNet), ``diffusion`` (schedule, DDIM, CFG), ``adapters``
(mace_ops interfaces), ``scorer`` (hue rule, CNN probe), ``evaluate`` (MACE metrics,
loading the shipped world), ``templates`` (prompt templates for erasure methods),
``checkpoint`` (atomic fp16 safetensors I/O). Weights: ``weights/`` (from
``scripts/train_toyworld.py``).
"""
