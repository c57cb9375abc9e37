"""Parameter sets: gradient shapes computed from model configs (no downloads, no weights), and the sizes of the
scaling curves. Adding a set is one ParamSet line in SETS (and, to run it by default, DEFAULT_SETS)."""
import math
from dataclasses import dataclass

import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def gpt2_shapes(n_layer, d, vocab=50257, n_ctx=1024):
    """HF GPT2LMHeadModel (lm_head tied to wte): 12 tensors per block."""
    shapes = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn.c_attn, attn.c_proj
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def bert_shapes(n_layer=12, d=768, ffn=3072, vocab=30522, max_pos=512, type_vocab=2):
    """HF BertModel (bert-base-uncased): embeddings, 16 tensors per layer, pooler."""
    shapes = [(vocab, d), (max_pos, d), (type_vocab, d), (d,), (d,)]
    for _ in range(n_layer):
        shapes += [(d, d), (d,)] * 4  # query, key, value, attention.output.dense
        shapes += [(d,), (d,), (ffn, d), (ffn,), (d, ffn), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def llama_shapes(n_layer=32, d=4096, ffn=11008, vocab=32000):
    """Llama-2-7B: embeddings, 9 tensors per layer, final norm, untied lm_head (291 tensors at 32 layers)."""
    shapes = [(vocab, d)]
    for _ in range(n_layer):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


def resnet50_shapes(blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), classes=1000):
    """torchvision resnet50: stem conv + BN, bottleneck blocks (1x1, 3x3, 1x1 convs, each with a BN's weight
    and bias; a 1x1 downsample conv + BN in each stage's first block), fc. 161 tensors, 25.6M elements."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for n, w in zip(blocks, widths):
        for b in range(n):
            shapes += [(w, cin, 1, 1), (w,), (w,), (w, w, 3, 3), (w,), (w,), (4 * w, w, 1, 1), (4 * w,), (4 * w,)]
            if b == 0:
                shapes += [(4 * w, cin, 1, 1), (4 * w,), (4 * w,)]
            cin = 4 * w
    return shapes + [(classes, cin), (classes,)]


def vit_shapes(layers=12, d=768, ffn=3072, patch=16, image=224, classes=1000):
    """timm vit_base_patch16_224 (ViT-B/16): cls token, position embedding, patch embedding, 12 tensors per
    block (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), final norm, head. 152 tensors, 86.6M elements."""
    shapes = [(1, 1, d), (1, (image // patch) ** 2 + 1, d), (d, 3, patch, patch), (d,)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (ffn, d), (ffn,), (d, ffn), (d,)]
    return shapes + [(d,), (d,), (classes, d), (classes,)]


def transformer_shapes(d_model=512, nhead=8, layers=6, ff=2048):
    """torch.nn.Transformer(d_model, nhead, layers + layers, ff), built on the meta device."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.nn.Transformer(d_model=d_model, nhead=nhead, num_encoder_layers=layers,
                                 num_decoder_layers=layers, dim_feedforward=ff, device="meta")
    return [tuple(p.shape) for p in m.parameters()]


def small_transformer_shapes():
    """examples/train_transformer.py --small: nn.Transformer(64, 4 heads, 2+2 layers, ff 128), an embedding
    of 32 tokens, 12 positions, a Linear head: 68 tensors, 0.17M elements. Small enough that threads cost
    more than they save, which is where a busy machine hurts most (issue 15)."""
    vocab, d, max_len = 32, 64, 12
    return transformer_shapes(d, 4, 2, 128) + [(vocab, d), (max_len, d), (vocab, d), (vocab,)]


def many_small_shapes(n_blocks=512, widths=(96, 128, 160, 192)):
    """A deep narrow network: per block a Linear (weight, bias) and a LayerNorm (weight, bias)."""
    shapes = []
    for i in range(n_blocks):
        w = widths[i % len(widths)]
        shapes += [(w, w), (w,), (w,), (w,)]
    return shapes


def with_dtype(shapes, dtype):
    return [(s, dtype) for s in shapes]


def mixed_dtypes(shapes):
    """bf16 weights (2-D and up), fp32 norms and biases (1-D)."""
    return [(s, BF16 if len(s) >= 2 else F32) for s in shapes]


@dataclass
class ParamSet:
    name: str
    about: str
    make: object  # layers (or None for the full model) -> [(shape, dtype)]
    layers: int = 0  # > 0: may be sized down to fewer layers when memory is short
    hidden: bool = False  # not part of "all" (the test sets)

    def specs(self, layers=None):
        return self.make(layers or self.layers or None)


def _same_shapes(name, about, shapes_fn, dtypes):
    """One set per dtype of the same model: '<name>' for fp32, '<name>-fp16', '<name>-bf16'."""
    suffix = {F32: "", F16: "-fp16", BF16: "-bf16"}
    short = {F32: "fp32", F16: "fp16", BF16: "bf16"}
    return [ParamSet(name + suffix[d], f"{about}, {short[d]}", lambda n, d=d: with_dtype(shapes_fn(), d))
            for d in dtypes]


SETS = {s.name: s for s in [
    ParamSet("gpt2-small", "GPT-2 small, fp32 (12 layers, d=768)", lambda n: with_dtype(gpt2_shapes(12, 768), F32)),
    ParamSet("gpt2-xl", "GPT-2 XL, fp32 (48 layers, d=1600)", lambda n: with_dtype(gpt2_shapes(48, 1600), F32)),
    *_same_shapes("bert-base", "BERT base (12 layers, d=768)", bert_shapes, (F32, F16, BF16)),
    *_same_shapes("resnet50", "ResNet-50 (torchvision)", resnet50_shapes, (F32, F16, BF16)),
    ParamSet("llama-7b", "Llama-2 7B, bf16 (32 layers, d=4096)",
             lambda n: with_dtype(llama_shapes(n or 32), BF16), layers=32),
    ParamSet("vit-b", "ViT-B/16 (timm vit_base_patch16_224), fp32", lambda n: with_dtype(vit_shapes(), F32)),
    ParamSet("transformer", "nn.Transformer d_model=512, 6+6 layers, fp32",
             lambda n: with_dtype(transformer_shapes(), F32)),
    ParamSet("transformer-small", "the training example's --small model (nn.Transformer d_model=64, 2+2 layers), fp32",
             lambda n: with_dtype(small_transformer_shapes(), F32)),
    ParamSet("many-small", "512 narrow blocks (Linear + LayerNorm), fp32",
             lambda n: with_dtype(many_small_shapes(), F32)),
    ParamSet("mixed", "GPT-2 small shapes: bf16 weights, fp32 norms and biases",
             lambda n: mixed_dtypes(gpt2_shapes(12, 768))),
    ParamSet("tiny", "2-layer GPT-2 (d=64), bf16 weights + fp32 vectors (smoke tests)",
             lambda n: mixed_dtypes(gpt2_shapes(2, 64, vocab=512, n_ctx=64)), hidden=True),
    ParamSet("tiny-fp16", "2-layer GPT-2 (d=64), fp16 (smoke tests)",
             lambda n: with_dtype(gpt2_shapes(2, 64, vocab=512, n_ctx=64), F16), hidden=True),
]}

DEFAULT_SETS = {"cpu": ["transformer-small", "gpt2-small", "transformer", "many-small", "mixed",
                        "bert-base", "bert-base-fp16", "bert-base-bf16", "resnet50", "resnet50-fp16", "resnet50-bf16"],
                "cuda": [n for n, s in SETS.items() if not s.hidden and n != "vit-b"]}  # vit-b: the AGC rows' (agc.py)
QUICK_SETS = {"cpu": ["transformer-small", "many-small", "gpt2-small"],
              "cuda": ["many-small", "gpt2-small", "mixed"]}
# torch.compile's compile time grows with the tensor count (on a 2-core CPU about 30 s for gpt2-small's 148
# tensors, more than 7 minutes for many-small's 2,048), so by default the CPU compiles gpt2-small only and a
# GPU one set of each model (not many-small); --compile-sets adds the others.
DEFAULT_COMPILE_SETS = {"cpu": ["gpt2-small"],
                        "cuda": ["gpt2-small", "gpt2-xl", "bert-base", "llama-7b", "transformer", "mixed"]}

# Scaling curves: "tensors": x tensors sharing SCALING_TENSORS_ELEMENTS elements; "elements": x elements spread
# over SCALING_ELEMENTS_TENSORS tensors.
SCALING = {
    "cuda": {"tensors": [1, 4, 16, 64, 256, 1000, 4000, 16000], "elements": [10**5, 10**6, 10**7, 10**8, 10**9]},
    "cpu": {"tensors": [1, 16, 256, 1000, 4000, 16000], "elements": [10**5, 10**6, 10**7, 3 * 10**7]},
    "quick": {"tensors": [1, 64, 1000], "elements": [10**4, 10**5, 10**6]},
}
SCALING_TENSORS_ELEMENTS = 4_000_000
SCALING_ELEMENTS_TENSORS = 100


def scaling_specs(curve, x, total=SCALING_TENSORS_ELEMENTS):
    if curve == "tensors":
        return [((total // x,), F32)] * x
    return [((max(1, x // SCALING_ELEMENTS_TENSORS),), F32)] * SCALING_ELEMENTS_TENSORS


def flat_specs(specs):
    """One flat tensor per dtype, as many elements as the set has of that dtype: the memory floor's input."""
    total = {}
    for shape, dtype in specs:
        total[dtype] = total.get(dtype, 0) + numel(shape)
    return [((n,), d) for d, n in total.items()]


def dtype_names(specs):
    return "+".join(dict.fromkeys(str(d).replace("torch.", "") for _, d in specs))


def numel(shape):
    return math.prod(shape)


def specs_bytes(specs):
    return sum(numel(s) * d.itemsize for s, d in specs)
