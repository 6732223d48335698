"""The preprocessed-output format as its readers see it (pipelines/dataset.py): counts and ids
from the manifest, the settings it was made with against a run's, raw and preprocessed never
mixed; and the BPE tokenizer learning the captions training reads, `.json` ones included."""
import json
import shutil

import pytest

from mmtrain.audit import manifest_ids
from mmtrain.config import RunConfig
from mmtrain.trainer import prepare_tokenizer
from pipelines.config import DataConfig, ImageConfig
from pipelines.dataset import DataMismatch, PreprocessedDataset, check_preprocessed, shard_counts
from pipelines.errors import UserError
from pipelines.shards import expand_shards
from tarutil import write_tar

WORD = "xylophonequartz"  # only in JSON captions: BPE merges it into a piece or two once it has read them


def _caption_shards(folder) -> str:
    """Text-only samples whose captions are JSON (both field names) or plain text."""
    folder.mkdir(parents=True)
    for s in range(2):
        members = []
        for i in range(12):
            key = f"s{s}-{i:03d}"
            if i % 3 == 0:
                members.append((f"{key}.json", json.dumps({"text": f"a {WORD} number {s}.{i}"}).encode()))
            elif i % 3 == 1:
                members.append((f"{key}.json", json.dumps({"caption": f"the {WORD} of {s}.{i}", "id": i}).encode()))
            else:
                members.append((f"{key}.txt", f"one more plain caption {s}.{i}".encode()))
        members.append((f"s{s}-bad.json", b"{not json"))  # skipped, as preprocessing quarantines it
        write_tar(folder / f"shard-{s:06d}.tar", members)
    return str(folder)


def _tokenizer(data: str, run_dir, preprocessed: bool):
    cfg = RunConfig(data_paths=(data,), run_dir=str(run_dir), tokenizer="bpe", bpe_vocab_size=300)
    return prepare_tokenizer(cfg, expand_shards([data]), preprocessed)


def test_bpe_is_trained_on_json_captions_of_raw_shards(tmp_path):
    raw = _caption_shards(tmp_path / "raw")
    tok = _tokenizer(raw, tmp_path / "run", preprocessed=False)
    assert len(tok.encode(f" {WORD}")) <= 4  # BOS, EOS and at most two pieces, not its 16 bytes


@pytest.fixture(scope="module")
def outputs(ray_cluster, tmp_path_factory):
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("dataset")
    raw = _caption_shards(root / "raw")
    preprocess([raw], str(root / "clean"), progress=False)
    return {"root": root, "raw": raw, "clean": str(root / "clean")}


def test_counts_ids_and_settings_come_from_the_output(outputs):
    shards = expand_shards([outputs["clean"]])
    counts = shard_counts(shards)
    ids = manifest_ids([outputs["clean"] + "/"])
    assert sum(counts.values()) == len(ids) == 24
    assert {s for s, _ in ids} == set(counts) == set(shards)
    dataset = PreprocessedDataset.find(outputs["clean"])
    assert dataset.settings == json.loads(json.dumps(DataConfig().to_dict())) and dataset.stats["written"] == 24
    assert PreprocessedDataset.find(outputs["raw"]) is None
    assert shard_counts(expand_shards([outputs["raw"]])) is None


def test_the_run_settings_must_match_and_kinds_must_not_mix(outputs, tmp_path):
    shards = expand_shards([outputs["clean"]])
    assert check_preprocessed(shards, DataConfig()) is True
    assert check_preprocessed(expand_shards([outputs["raw"]]), DataConfig()) is False
    with pytest.raises(DataMismatch, match="preprocessed at image size 224, the run uses 64"):
        check_preprocessed(shards, DataConfig(image=ImageConfig(size=64)))
    mixed = tmp_path / "mixed"
    shutil.copytree(outputs["raw"], mixed / "raw")
    shutil.copytree(outputs["clean"], mixed / "clean")
    with pytest.raises(UserError, match="mixes preprocessed output and raw shards"):
        check_preprocessed(expand_shards([str(mixed)]), DataConfig())


def test_bpe_is_trained_on_the_stored_captions_of_preprocessed_shards(outputs, tmp_path):
    tok = _tokenizer(outputs["clean"], tmp_path / "run", preprocessed=True)
    assert len(tok.encode(f" {WORD}")) <= 4
