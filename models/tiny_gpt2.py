"""Tiny random-weight Hugging Face GPT-2 (2 layers, hidden 32, 4 heads, Conv1D weights stored [in, out]).

For trying `surgeon-compile` in seconds: `surgeon-compile models/tiny_gpt2.py --calib-length 128`.
Weights are random (perplexities are about the vocabulary size, 128); text is read one byte per token
(`surgeon_fx.zoo.ByteTokenizer`): calibration windows from WikiText-2 valid, evaluation windows of 128 tokens
from WikiText-2 raw test (`$SURGEON_DATA` overrides the data folder; `--calib-file` / `--eval-file` any text).
"""
from surgeon_fx import zoo
from surgeon_fx.hf import tiny_gpt2


def build():
    return tiny_gpt2(seed=0)


tokenizer, calibration, evaluation = zoo.byte_text_contract(vocab=128, eval_length=128, eval_limit=32)
