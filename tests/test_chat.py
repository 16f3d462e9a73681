import pytest

from llmctl.chat import render_chat, render_prompt
from llmctl.config import FinetuneConfig
from llmctl.errors import LlmctlError

FT = FinetuneConfig()


def test_a_conversation_is_the_training_template_joined_by_eos():
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "Again"}]
    want = render_prompt("Say hi", "", FT) + "hi<eos>" + render_prompt("Again", "", FT)
    assert render_chat(msgs, FT, "<eos>") == want
    assert want == "### Instruction:\nSay hi\n\n### Response:\nhi<eos>### Instruction:\nAgain\n\n### Response:\n"


def test_a_system_message_opens_the_prompt_and_same_role_messages_are_joined():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "user", "content": "b"}]
    assert render_chat(msgs, FT, "</s>") == "Be brief.\n\n" + render_prompt("a\n\nb", "", FT)


def test_the_tokens_equal_training_examples_joined_by_the_eos_id():
    # what an instruction-tuned model saw in training: each prompt+response encoded, then <eos>
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["### Instruction:\nSay hi\n\n### Response:\nhello there, friend. " * 50], 300)
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "Say hi"}]
    ids = tok.encode(render_chat(msgs, FT, tok.eos_token))
    want = tok.encode(render_prompt("Say hi", "", FT) + "hello there") + [tok.eos_id] + \
        tok.encode(render_prompt("Say hi", "", FT))
    assert ids == want


@pytest.mark.parametrize("msgs, words", [
    ([], "at least one message"),
    ([{"role": "user"}], "messages[0]"),
    ([{"role": "robot", "content": "x"}], "messages[0]"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "messages[1]: a system message"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message must be the user's"),
    ([{"role": "system", "content": "x"}], "last message must be the user's"),
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "must start with a user message"),
])
def test_malformed_conversations_name_the_message(msgs, words):
    with pytest.raises(LlmctlError, match=words.replace("[", r"\[").replace("]", r"\]")):
        render_chat(msgs, FT, "<eos>")


CONVERSATIONS = [
    [{"role": "user", "content": "Say hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again, \"louder\" {x} \\n"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.mark.parametrize("msgs", CONVERSATIONS)
def test_the_jinja_chat_template_renders_exactly_render_chat(msgs):
    transformers = pytest.importorskip("transformers")
    from llmctl.chat import chat_template
    from llmctl.tokenizer import Tokenizer

    ft = FinetuneConfig(prompt_template_no_input="<<{instruction}>>\n{{literal}}\n")
    tok = Tokenizer.train_char(["abc"])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk, eos_token=tok.eos_token,
                                              chat_template=chat_template(ft, tok.eos_token))
    assert hf.apply_chat_template(msgs, tokenize=False) == render_chat(msgs, ft, tok.eos_token)
    assert hf.apply_chat_template(msgs, tokenize=False, chat_template=chat_template(FT, "</s>")) == \
        render_chat(msgs, FT, "</s>")
