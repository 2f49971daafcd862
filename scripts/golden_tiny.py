"""Item 2: tiny random token classifiers with forward + backward goldens.

Outputs:
  tests/golden/tiny-bert/    config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                             golden.safetensors
  tests/golden/tiny-roberta/ config.json, model.safetensors, tokenizer.json (the BPE of item 1),
                             tokenizer_config.json, special_tokens_map.json, golden.safetensors

Weights are created in float32 (HF init with initializer_range 0.2, then every bias and
every LayerNorm weight/bias re-drawn: bias ~ N(0, 0.2), LayerNorm weight ~ 1 + N(0, 0.2)),
saved as f32 by save_pretrained. The reference forward/backward runs on a float64 copy
(eager attention, eval mode, dropout 0) and results are stored as f32.

golden.safetensors keys (B=3, T=11, L=5, C=hidden, N=num_hidden_layers=2):
  input_ids [B,T] i64, attention_mask [B,T] i64, token_type_ids [B,T] i64 (zeros),
  position_ids [B,T] i64, labels [B,T] i64, logits [B,T,L] f32, loss [1] f32,
  hidden [B,T,C] f32, hidden_all [N+1,B,T,C] f32, grad.<param name> f32 (one per parameter).
"""

import copy
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from golden_common import GOLDEN, seed_all

LABELS = ["O", "B-X", "I-X", "B-Y", "I-Y"]
LENGTHS = [11, 7, 3]  # real tokens per sequence, specials included
T = 11


def common_config(**kw):
    return dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        initializer_range=0.2,
        num_labels=len(LABELS),
        id2label={i: l for i, l in enumerate(LABELS)},
        label2id={l: i for i, l in enumerate(LABELS)},
        **kw,
    )


@torch.no_grad()
def randomise(model, gen):
    """Every bias ~ N(0, 0.2); LayerNorm weight ~ 1 + N(0, 0.2). All f32."""
    for name, p in model.named_parameters():
        if "LayerNorm" in name and name.endswith(".weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32))


def make_batch(gen, vocab, first_id, cls_id, sep_id, pad_id):
    """input_ids [B,T] with <cls> ... <sep> then pad; labels with -100 at specials, padding
    and a few inner positions (as if they were non-first subwords)."""
    B = len(LENGTHS)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    mask = torch.zeros((B, T), dtype=torch.int64)
    labels = torch.full((B, T), -100, dtype=torch.int64)
    for b, n in enumerate(LENGTHS):
        inner = torch.randint(first_id, vocab, (n - 2,), generator=gen)
        ids[b, 0] = cls_id
        ids[b, 1 : n - 1] = inner
        ids[b, n - 1] = sep_id
        mask[b, :n] = 1
        labels[b, 1 : n - 1] = torch.randint(0, len(LABELS), (n - 2,), generator=gen)
    # exercise the top of the embedding table
    ids[0, 1] = vocab - 1
    # a few non-first subwords inside the longer sequences
    labels[0, 3] = -100
    labels[0, 6] = -100
    labels[1, 2] = -100
    return ids, mask, labels


def reference(model, ids, mask, labels, position_ids):
    """float64 forward + backward; returns dict of f32 tensors."""
    m = copy.deepcopy(model).double().eval()
    m.zero_grad(set_to_none=True)
    out = m(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=torch.zeros_like(ids),
        position_ids=position_ids,
        labels=labels,
        output_hidden_states=True,
    )
    # HF token-classification loss: mean CE over labels != -100
    ref_loss = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, ref_loss, rtol=0, atol=1e-12)
    out.loss.backward()
    res = {
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1),
        "hidden": out.hidden_states[-1].detach().float().contiguous(),
        "hidden_all": torch.stack(out.hidden_states).detach().float().contiguous(),
    }
    for name, p in m.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        res["grad." + name] = g.detach().float().contiguous()
    # the f32 model must agree with the f64 reference to ~1e-6 (sanity check on the setup)
    m32 = copy.deepcopy(model).eval()
    with torch.no_grad():
        o32 = m32(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)
    rel = (o32.logits - res["logits"]).norm() / res["logits"].norm()
    assert rel < 1e-5, rel
    return res, float(rel)


def check_names(folder, golden):
    """model.safetensors holds f32 tensors named exactly like the grad.* keys, and the saved
    folder reloads in transformers to the golden logits."""
    from transformers import AutoModelForTokenClassification

    m = AutoModelForTokenClassification.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        lg = m(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"]).logits
    rel = (lg - golden["logits"]).norm() / golden["logits"].norm()
    assert rel < 1e-5, rel
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k in keys:
            assert f.get_tensor(k).dtype == torch.float32, k
    grads = {k[5:] for k in golden if k.startswith("grad.")}
    assert keys == grads, (keys ^ grads)


def tiny_bert():
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForTokenClassification, BertTokenizer

    out = os.path.join(GOLDEN, "tiny-bert")
    os.makedirs(out, exist_ok=True)
    seed_all(1)
    gen = torch.Generator().manual_seed(1)
    # A 99-entry WordPiece vocab (ids are what the golden is about, not text).
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,!?'\"-@#:;()/&")
    cont = ["##" + c for c in letters]
    words = ["the", "and", "of", "to", "in", "is", "##ed", "##ing", "##er", "##ly", "##es", "##0", "##1", "##2",
             "##3", "##4", "##5", "##6", "##7"]
    vocab_list = specials + letters + digits + punct + cont
    for w in words:
        if len(vocab_list) == 99:
            break
        if w not in vocab_list:
            vocab_list.append(w)
    assert len(vocab_list) == 99 and len(set(vocab_list)) == 99, len(vocab_list)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab_list)}, do_lower_case=True, model_max_length=40)
    tok.save_pretrained(out)
    Tokenizer.from_file(os.path.join(out, "tokenizer.json"))  # loadable by plain tokenizers
    cls_id, sep_id, pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    assert (pad_id, cls_id, sep_id) == (0, 2, 3)

    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        type_vocab_size=2,
        pad_token_id=pad_id,
        **common_config(),
    )
    cfg._attn_implementation = "eager"
    model = BertForTokenClassification(cfg).float()
    randomise(model, gen)
    model.save_pretrained(out)

    ids, mask, labels = make_batch(gen, 99, len(specials), cls_id, sep_id, pad_id)
    # BERT: position ids are 0..T-1 for every row, padding included (the position_ids buffer)
    position_ids = model.bert.embeddings.position_ids[:, :T].expand(ids.shape[0], T).clone()
    res, rel = reference(model, ids, mask, labels, position_ids)
    # the explicit position_ids equal what transformers computes by itself
    with torch.no_grad():
        o = copy.deepcopy(model).double().eval()(input_ids=ids, attention_mask=mask)
    assert torch.equal(o.logits.float(), res["logits"])
    golden = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                  position_ids=position_ids, labels=labels, **res)
    save_file(golden, os.path.join(out, "golden.safetensors"))
    check_names(out, golden)
    print(f"tiny-bert: loss {res['loss'].item():.6f}, f32-vs-f64 logits rel err {rel:.2e}")


def tiny_roberta():
    from transformers import AutoTokenizer, RobertaConfig, RobertaForTokenClassification
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    import golden_bpe

    out = os.path.join(GOLDEN, "tiny-roberta")
    golden_bpe.copy_tokenizer(out, model_max_length=38)
    tok = AutoTokenizer.from_pretrained(out, add_prefix_space=True)
    vocab = len(tok)
    seed_all(2)
    gen = torch.Generator().manual_seed(2)
    cls_id, sep_id, pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    assert (cls_id, pad_id, sep_id) == (0, 1, 2)

    cfg = RobertaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=64,
        type_vocab_size=1,
        pad_token_id=pad_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        **common_config(),
    )
    cfg._attn_implementation = "eager"
    model = RobertaForTokenClassification(cfg).float()
    randomise(model, gen)
    model.save_pretrained(out)

    ids, mask, labels = make_batch(gen, vocab, 5, cls_id, sep_id, pad_id)
    # RoBERTa: positions start at padding_idx + 1; padding gets padding_idx
    position_ids = RobertaEmbeddings.create_position_ids_from_input_ids(ids, pad_id)
    res, rel = reference(model, ids, mask, labels, position_ids)
    with torch.no_grad():
        o = copy.deepcopy(model).double().eval()(input_ids=ids, attention_mask=mask)
    assert torch.equal(o.logits.float(), res["logits"])
    golden = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                  position_ids=position_ids, labels=labels, **res)
    save_file(golden, os.path.join(out, "golden.safetensors"))
    check_names(out, golden)
    print(f"tiny-roberta: vocab {vocab}, loss {res['loss'].item():.6f}, f32-vs-f64 logits rel err {rel:.2e}")


def main():
    tiny_bert()
    tiny_roberta()


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
