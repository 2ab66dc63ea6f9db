"""Chat records: rendered with the tokenizer's chat template, loss on exactly the assistant turns; the fallback
format without a template; the end-of-sequence token a causal LM needs."""

import json

import pytest
import torch

from loralab.chat import FALLBACK_TEMPLATE
from loralab.dataset import IGNORE_INDEX, check_records, tokenize

WORDS = ("you are terse . hi how far is oslo from bergen ? about 460 km and to cairo far thanks welcome "
         "what time it noon").split()
SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "system", "content": "you are terse ."},
        {"role": "user", "content": "how far is oslo from bergen ?"},
        {"role": "assistant", "content": "about 460 km ."},
        {"role": "user", "content": "and to cairo ?"},
        {"role": "assistant", "content": "far ."},
        {"role": "user", "content": "thanks"}]


def word_tokenizer(template: str | None = TEMPLATE, eos: str | None = "</s>", kind: str = "wordlevel"):
    """A tiny fast tokenizer built offline (tokenizers WordLevel or BPE) with an optional jinja chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    if kind == "wordlevel":
        vocab = {t: i for i, t in enumerate(["[UNK]", *WORDS, ":", "system", "user", "assistant"])}
        core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
    else:  # byte-level BPE: spaces are part of the tokens, merges cross word boundaries
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        corpus = [" ".join(WORDS)] * 4 + [m["content"] for m in CHAT] * 4 + ["system: user: assistant:"] * 4
        core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                  unk_token="[UNK]", additional_special_tokens=SPECIAL[3:])
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    tok.chat_template = template
    return tok


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chat_example_of(tok, messages=CHAT):
    data = tokenize([{"messages": messages, "_line": 1}], tok, "causal-lm")
    return data.examples[0]["input_ids"], data.examples[0]["labels"]


def test_the_labels_cover_exactly_the_assistant_turns():
    tok = word_tokenizer()
    ids, labels = chat_example_of(tok)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == ids_of(tok, rendered)                    # the template's text, tokenized once
    assert len(labels) == len(ids)
    end = tok.convert_tokens_to_ids("<|end|>")
    expected = ids_of(tok, "about 460 km .") + [end] + ids_of(tok, "far .") + [end]
    assert [t for t in labels if t != IGNORE_INDEX] == expected   # each reply and the end of its turn
    kept = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in kept)                 # a target is the token at its own position
    # everything else is masked: the system and user turns, the role headers, the last user turn
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    for text in ("you are terse", "how far is oslo from bergen", "and to cairo", "thanks", "<|assistant|>"):
        assert text in masked
    assert "about" not in masked and "460" not in masked


def test_a_bpe_tokenizer_whose_tokens_carry_the_spaces():
    tok = word_tokenizer(kind="bpe")
    ids, labels = chat_example_of(tok)
    targets = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert targets.replace(" ", "") == "about460km.<|end|>far.<|end|>"


def test_the_loss_is_taken_on_the_assistant_tokens_only():
    """Through the trainer's loss: changing the logits at masked positions changes nothing, and the loss is the
    mean cross-entropy over the assistant tokens (computed independently here)."""
    from loralab.batch_loss import logits_loss_sum
    tok = word_tokenizer()
    ids, labels = chat_example_of(tok)
    torch.manual_seed(0)
    logits = torch.randn(1, len(ids), len(tok), requires_grad=True)
    loss = logits_loss_sum(logits, torch.tensor([labels]), "causal-lm")
    loss.backward()
    predicts = {i - 1 for i, t in enumerate(labels) if t != IGNORE_INDEX}   # position t predicts token t + 1
    touched = {int(i) for i in logits.grad[0].abs().sum(-1).nonzero()}
    assert touched == predicts
    ref = sum(torch.nn.functional.cross_entropy(logits[0, i].detach(), torch.tensor(ids[i + 1])) for i in predicts)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_without_a_chat_template_the_fallback_format_is_used_and_said():
    tok = word_tokenizer(template=None)
    with pytest.warns(UserWarning, match="no chat template; the conversations are rendered as 'role: content'"):
        ids, labels = chat_example_of(tok)
    text = tok.apply_chat_template(CHAT, chat_template=FALLBACK_TEMPLATE, tokenize=False)
    assert text == ("<s>system: you are terse .\nuser: how far is oslo from bergen ?\nassistant: about 460 km .</s>\n"
                    "user: and to cairo ?\nassistant: far .</s>\nuser: thanks")
    assert ids == ids_of(tok, text)
    eos = tok.eos_token_id
    assert [t for t in labels if t != IGNORE_INDEX] == ids_of(tok, "about 460 km .") + [eos] + ids_of(tok, "far .") + [eos]


def test_no_end_of_sequence_token_is_an_error_that_names_the_fix():
    tok = word_tokenizer(eos=None)
    for record in ({"messages": CHAT}, {"text": "hi"}, {"prompt": "hi", "completion": "thanks"}):
        with pytest.raises(ValueError, match='has no end-of-sequence token.*"eos_token": "</s>".*tokenizer_config.json'):
            tokenize([record], tok, "causal-lm")


@pytest.mark.parametrize("messages, fragment", [
    ([], "'messages' must be a non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant message, so nothing to learn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "message 0 must be"),
    ("hi", "'messages' must be a non-empty list"),
])
def test_malformed_chat_records_name_the_line(messages, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        check_records([{"messages": messages, "_line": 7}], "causal-lm", "chat.jsonl")
    assert "chat.jsonl, line 7" in str(info.value)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """A template that shows only the last assistant reply (as some reasoning templates do with thoughts):
    the prefix rendered for an earlier reply is not a prefix of the whole conversation."""
    hiding = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|> "
              "{{ m['content'] }} <|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ValueError, match="renders the conversation before assistant message 2 differently"):
        chat_example_of(word_tokenizer(template=hiding), CHAT[:5])


def test_chat_training_end_to_end_on_a_tiny_llama(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    from loralab.cli import main
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                         max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"messages": CHAT[:3]}, {"messages": CHAT}, {"messages": CHAT[1:5]}] * 6
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--json", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "chat.jsonl"),
                 "--eval-data", str(tmp_path / "chat.jsonl"), "--task", "causal-lm", "--out", str(tmp_path / "out"),
                 "--epochs", "6", "--lr", "1e-2", "--batch-size", "6", "--target-modules", "all-linear", "--loraplus-lr-ratio", "16",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["loss_after"] < 0.9 * result["loss_before"]   # a random tiny base: the adapters alone learn slowly
