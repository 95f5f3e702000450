"""Converting a SentencePiece model to Hugging Face's tokenizer.json takes seconds and the data tools run once per
input file: each model converts once per machine, and the folder written from the cache is the same to the byte."""
import pytest

from evods.checkpoint.formats import hf_tokenizer
from evods.checkpoint.formats.hf_tokenizer import CACHE_ENV, tokenizer_cache_dir, write_tokenizer
from testkit.paths import TOKENIZER


def written(tmp_path, name: str) -> dict[str, bytes]:
    folder = tmp_path / name
    folder.mkdir()
    write_tokenizer(str(TOKENIZER), str(folder), 2048, None)
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_sentencepiece_model_converts_once_and_the_cached_folder_is_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    converted = written(tmp_path, "converted")
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1

    def no_conversion(folder):
        raise AssertionError("converted again despite the cache")

    with monkeypatch.context() as patched:
        patched.setattr(hf_tokenizer, "_fast_tokenizer_json", no_conversion)
        assert written(tmp_path, "from_cache") == converted
    # a cache that cannot be used (a file where its folder would be) only costs the conversion
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "not_a_folder"))
    assert written(tmp_path, "without_cache") == converted
    monkeypatch.setenv(CACHE_ENV, "")
    assert tokenizer_cache_dir() is None


@pytest.mark.parametrize("environment, expected", [({"XDG_CACHE_HOME": "/x"}, "/x/evods/tokenizers"),
                                                   ({CACHE_ENV: "/y"}, "/y/tokenizers")])
def test_the_cache_lives_where_the_environment_says(monkeypatch, environment, expected):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert str(tokenizer_cache_dir()) == expected
