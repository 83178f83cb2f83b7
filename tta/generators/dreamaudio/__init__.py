"""DreamAudio (seed 002): customized text-to-audio from a prompt and K reference concepts.

`conditioning` (reference latents and reference captions as conditioners), `generator` (the pure
inference model, `DreamAudioGenerator`), `module` (the training wrapper, registered ``dreamaudio``);
the network is `tta.nn.mrc_unet.MRCUNet`, the pipeline `tta.pipelines.dreamaudio`. See docs/dreamaudio.md.
"""
