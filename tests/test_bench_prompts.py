"""The Galaxy-demo prompt-file reader and the prompt files shipped for the demo presets."""
import json

import pytest

from bench.prompts import SAMPLES_DIR, PromptFileError, load_prompts, read_prompt_file
from bench.textgen import LOGBOOK_PATH, logbook


def write(path, entries):
    path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    return path


def test_context_is_read_relative_to_the_prompt_file_and_joined_like_the_demo(tmp_path, monkeypatch):
    (tmp_path / "book.txt").write_text("Once upon a time.")
    prompts = write(tmp_path / "p.json", [{"prompt": "Who?", "context": "book.txt"}, {"prompt": "Plain question"}])
    monkeypatch.chdir("/")
    assert load_prompts(prompts) == ["```Once upon a time.```\n\nWho?", "Plain question"]


def test_base_model_prompts_are_the_context_alone(tmp_path):
    (tmp_path / "book.txt").write_text("Once upon a time.")
    prompts = write(tmp_path / "p.json", [{"prompt": "Who?", "context": "book.txt"}])
    assert load_prompts(prompts, instruct=False) == ["Once upon a time."]


def test_max_length_keeps_the_first_characters_of_the_context(tmp_path):
    (tmp_path / "abc.txt").write_text("abcdefghij")
    prompts = write(
        tmp_path / "p.json",
        [
            {"prompt": "Q", "context": str(tmp_path / "abc.txt"), "max_length": 4},
            {"prompt": "Q", "context": "abc.txt", "max_length": 100},
        ],
    )
    assert load_prompts(prompts) == ["```abcd```\n\nQ", "```abcdefghij```\n\nQ"]


def test_missing_context_file_names_the_entry_and_the_context(tmp_path):
    prompts = write(tmp_path / "p.json", [{"prompt": "ok"}, {"prompt": "Q", "context": "nowhere.txt"}])
    with pytest.raises(PromptFileError, match=r"p\.json: entry 1: cannot read context 'nowhere.txt'"):
        load_prompts(prompts)


def test_unreachable_context_url_names_the_entry(tmp_path):
    prompts = write(tmp_path / "p.json", [{"prompt": "Q", "context": "http://127.0.0.1:9/book.txt"}])
    with pytest.raises(PromptFileError, match=r"entry 0: cannot read context 'http://127\.0\.0\.1:9/book\.txt'"):
        load_prompts(prompts)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"prompt": "a",}]', "not valid JSON"),
        ('{"prompt": "a"}', "expected a JSON list of prompt entries, got dict"),
        ("[]", "the list of prompts is empty"),
        ('[{"prompt": "a"}, {"question": "b"}]', "entry 1: prompt: Field required; question: Extra inputs"),
        ('[{"prompt": "a", "max_length": 0}]', "entry 0: max_length: Input should be greater than 0"),
        ('[{"prompt": 3}]', "entry 0: prompt: Input should be a valid string"),
        ('["just a string"]', "entry 0: Input should be a valid dictionary"),
    ],
)
def test_bad_files_are_rejected_with_the_reason(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(PromptFileError, match="bad.json: " + ".*" + message.replace("(", r"\(")):
        read_prompt_file(path)


def test_a_prompt_file_not_in_utf8_is_a_prompt_file_error(tmp_path):
    """A Latin-1 or UTF-16 file raised UnicodeDecodeError: a traceback from bench.demo and bench.client."""
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"prompt": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(PromptFileError, match="latin1.json: not UTF-8 text"):
        read_prompt_file(path)


def test_missing_prompt_file_is_a_prompt_file_error(tmp_path):
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        read_prompt_file(tmp_path / "absent.json")


def test_shipped_logbook_is_the_generator_output():
    assert LOGBOOK_PATH.read_text(encoding="utf-8") == logbook()


def test_shipped_samples_load_and_long_contexts_double_in_length():
    assert len(load_prompts(SAMPLES_DIR / "batch32.json")) == 32
    lengths = [len(load_prompts(SAMPLES_DIR / f"long_{k}k.json")[0]) for k in (4, 8, 16, 32, 64, 128)]
    for shorter, longer in zip(lengths, lengths[1:]):
        assert 1.9 < longer / shorter < 2.1
    # max_length, not the end of the text, sets every length: the logbook is longer than the longest cut.
    assert read_prompt_file(SAMPLES_DIR / "long_128k.json")[0].max_length < len(logbook())
    assert sum(p.stat().st_size for p in SAMPLES_DIR.iterdir()) < 2_000_000


@pytest.mark.parametrize("flags", [["--days", "0"], ["--days", "-3"], ["--out", "/nonexistent-folder/logbook.txt"]])
def test_textgen_refuses_a_bad_output_before_writing(flags, tmp_path, capsys):
    """--days 0 or less wrote a 1-byte logbook (the long prompt files then cut it to nothing); an --out in a missing
    folder ended in FileNotFoundError's traceback."""
    from bench import textgen

    out = ["--out", str(tmp_path / "logbook.txt")] if flags[0] == "--days" else []
    with pytest.raises(SystemExit) as exit_:
        textgen.main([*out, *flags])
    assert exit_.value.code == 2 and flags[0] in capsys.readouterr().err
    assert not (tmp_path / "logbook.txt").exists()


def test_every_entry_of_a_long_file_is_read(tmp_path):
    """bench.serving times a file's prompts in order, however many: the demo's 32 is a batch, not a file limit."""
    path = tmp_path / "many.json"
    path.write_text(json.dumps([{"prompt": f"question {i}"} for i in range(40)]))
    assert load_prompts(path) == [f"question {i}" for i in range(40)]
