"""The shipped workflows' names: the Templates browser shows each file's name as its card's title, numbered in the
order a creator uses them (the UI file `workflows/<name>.json`, its API twin `workflows/api/<name>.api.json`)."""

DISTIL = "1 - Distil a checkpoint into a few-step student"
DISTIL_STYLE = "2 - Distil a checkpoint with a style LoRA"
DISTIL_SPEED = "3 - Distil starting from a speed LoRA"
SAMPLE_FEW_STEP = "4 - Sample the student LoRA with the Few-Step Sampler"
SAMPLE_STOCK = "5 - Sample the student LoRA with stock nodes"
