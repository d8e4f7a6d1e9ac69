"""The ChatML chat template text: the one fact `data/` (the run's template, data/chat_template.py) and `models/`
(the tiny tokenizer, models/tokenizer.py) share, below both so that neither imports the other for it.

What the template renders and why the run uses it: eksft_pipeline/data/chat_template.py. Imports nothing.
"""

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and generation_prefix is defined and generation_prefix -%}"
    "{{- generation_prefix -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if generation_prefix is defined and generation_prefix -%}{{- generation_prefix -}}{%- endif -%}"
    "{%- endif -%}"
)

__all__ = ["CHATML"]
