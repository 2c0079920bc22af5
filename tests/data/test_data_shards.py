"""Shard writer/reader and mixture sampler: round trips, splitting, shuffling, resume, bad data."""

import io
import json
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import idefics.data.shards as shards_module
from idefics.data import DataError, Mixture, Sample, ShardReader, ShardWriter, Source, Turn, assign_shards


def noise_image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def text_docs(n: int, prefix: str = "d") -> list[Sample]:
    return [Sample("document", f"{prefix}{i:04d}", items=[f"text {i}"], meta={"i": i}) for i in range(n)]


def write(path_pattern: str, samples, max_count=1000, **kw) -> list[str]:
    with ShardWriter(path_pattern, max_count=max_count, **kw) as writer:
        for s in samples:
            writer.write(s)
    return writer.shards


def keys(samples) -> list[str]:
    return [s.key for s in samples]


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_all_three_kinds(tmp_path):
    images = [noise_image(i) for i in range(5)]
    grey = noise_image(9, mode="L")
    samples = [
        Sample("pair", "p0", items=[images[0], "a caption"], meta={"label": 3, "tags": ["x", "y"]}),
        Sample("document", "d0", items=["intro", images[1], "after one", images[2], "after two"]),
        Sample("chat", "c0", turns=[Turn("user", [images[3], "What is it?"]), Turn("assistant", ["noise"]),
                                    Turn("user", ["And this?", grey]), Turn("assistant", ["more noise"])],
               meta={"answer": "noise"}),
    ]
    shard_paths = write(str(tmp_path / "rt-%03d.tar"), samples)
    back = list(ShardReader(shard_paths, image_mode=None))
    assert keys(back) == ["p0", "d0", "c0"]
    for original, decoded in zip(samples, back):
        assert decoded.kind == original.kind and decoded.meta == original.meta
        assert decoded.shard == shard_paths[0]
        flat = lambda s: s.items if s.kind != "chat" else [x for t in s.turns for x in t.content]  # noqa: E731
        assert [t.role for t in decoded.turns] == [t.role for t in original.turns]
        for a, b in zip(flat(original), flat(decoded)):
            if isinstance(a, str):
                assert a == b
            else:  # PNG is lossless: same pixels, same mode
                assert b.mode == a.mode and np.array_equal(np.asarray(a), np.asarray(b))
    assert len(back[1].images) == 2 and len(back[2].images) == 2


def test_reader_converts_to_rgb_and_jpeg_is_close(tmp_path):
    image = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)), mode="L")
    write(str(tmp_path / "j-%03d.tar"), [Sample("pair", "k", items=[image, "gradient"])], image_format="jpg")
    (sample,) = ShardReader(str(tmp_path / "j-*.tar"))
    decoded = sample.images[0]
    assert decoded.mode == "RGB"
    diff = np.abs(np.asarray(decoded, dtype=float)[..., 0] - np.asarray(image, dtype=float))
    assert diff.mean() < 3  # lossy, but the same picture


def test_undecoded_bytes_rewrite_to_identical_shards(tmp_path):
    samples = [Sample("pair", f"k{i}", items=[noise_image(i), f"c{i}"]) for i in range(3)]
    first = write(str(tmp_path / "a-%03d.tar"), samples)
    raw = list(ShardReader(first, decode_images=False))
    assert all(isinstance(s.images[0], bytes) for s in raw)
    second = write(str(tmp_path / "b-%03d.tar"), raw)
    assert open(first[0], "rb").read() == open(second[0], "rb").read()


def test_writer_rolls_shards_by_count(tmp_path):
    paths = write(str(tmp_path / "roll-%05d.tar"), text_docs(7), max_count=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["roll-00000.tar", "roll-00001.tar", "roll-00002.tar"]
    per_shard = Counter(s.shard for s in ShardReader(paths))
    assert [per_shard[p] for p in paths] == [3, 3, 1]


@pytest.mark.parametrize("sample, words", [
    (Sample("pair", "two", items=[noise_image(0), noise_image(1), "x"]), "exactly one image"),
    (Sample("pair", "none", items=["only text"]), "exactly one image"),
    (Sample("video", "v", items=["x"]), "unknown kind 'video'"),
    (Sample("document", "has.dot", items=["x"]), "key 'has.dot'"),
    (Sample("document", "empty", items=[]), "items must be a non-empty list"),
    (Sample("document", "num", items=["x", 3]), "items[1] is a int"),
    (Sample("chat", "role", turns=[Turn("system", ["x"])]), "turns[0]"),
    (Sample("chat", "noturns"), "at least one turn"),
    (Sample("document", "meta", items=["x"], meta={"bad": {1, 2}}), "meta is not JSON-serialisable"),
])
def test_writer_rejects_invalid_samples_naming_key(tmp_path, sample, words):
    with ShardWriter(str(tmp_path / "bad-%03d.tar")) as writer:
        with pytest.raises(DataError) as info:
            writer.write(sample)
    assert words in str(info.value)
    assert repr(sample.key) in str(info.value)


def test_writer_rejects_duplicate_keys(tmp_path):
    with ShardWriter(str(tmp_path / "dup-%03d.tar")) as writer:
        writer.write(text_docs(1)[0])
        with pytest.raises(DataError, match="duplicate key"):
            writer.write(text_docs(1)[0])


# ------------------------------------------------------------------------------- splitting and shuffling


@pytest.fixture
def twelve_shards(tmp_path):
    paths = write(str(tmp_path / "s-%05d.tar"), text_docs(60), max_count=5)
    assert len(paths) == 12
    return paths


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_and_workers_partition_the_samples(twelve_shards, monkeypatch, shuffle):
    world_size, num_workers = 2, 3
    seen = []
    for rank in range(world_size):
        for worker in range(num_workers):
            info = SimpleNamespace(id=worker, num_workers=num_workers)
            monkeypatch.setattr(shards_module, "get_worker_info", lambda info=info: info)
            reader = ShardReader(twelve_shards, shuffle=shuffle, seed=3, rank=rank, world_size=world_size)
            reader.set_epoch(2)
            got = list(reader)
            assert len({s.shard for s in got}) == 2  # 12 shards over 6 slots
            seen += keys(got)
    assert sorted(seen) == [f"d{i:04d}" for i in range(60)]  # every sample exactly once


def test_assign_shards_is_a_partition_for_uneven_counts():
    shards = [f"s{i}" for i in range(7)]
    parts = [assign_shards(shards, seed=1, epoch=4, shuffle=True, rank=r, world_size=2, worker_id=w, num_workers=2)
             for r in range(2) for w in range(2)]
    assert sorted(x for p in parts for x in p) == sorted(shards)
    assert sorted(map(len, parts)) == [1, 2, 2, 2]


def test_torch_dataloader_workers_read_each_sample_once(twelve_shards):
    reader = ShardReader(twelve_shards, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(reader, batch_size=4, num_workers=2, collate_fn=list)
    got = [s for batch in loader for s in batch]
    assert sorted(keys(got)) == [f"d{i:04d}" for i in range(60)]
    reader.record(s.shard for s in got)  # the main process counts what it consumed
    assert sum(reader.state_dict()["position"].values()) == 60


def test_shuffle_is_deterministic_per_seed_and_epoch(twelve_shards):
    def order(seed, epoch, shuffle=True):
        reader = ShardReader(twelve_shards, shuffle=shuffle, seed=seed, shuffle_buffer=16)
        reader.set_epoch(epoch)
        return keys(reader)

    assert order(0, 0, shuffle=False) == [f"d{i:04d}" for i in range(60)]
    assert order(5, 1) == order(5, 1)
    assert sorted(order(5, 1)) == order(0, 0, shuffle=False)
    assert order(5, 1) != order(5, 2)
    assert order(5, 1) != order(6, 1)
    assert order(5, 1) != order(0, 0, shuffle=False)


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_continues_exactly(twelve_shards, shuffle):
    reader = ShardReader(twelve_shards, shuffle=shuffle, seed=7, shuffle_buffer=8)
    reader.set_epoch(1)
    full = keys(reader)
    it = iter(reader)
    head = [next(it).key for _ in range(23)]
    state = json.loads(json.dumps(reader.state_dict()))  # a trainer checkpoints it as JSON
    assert sum(state["position"].values()) == 23

    resumed = ShardReader(twelve_shards, shuffle=shuffle, seed=7, shuffle_buffer=8)
    resumed.load_state_dict(state)
    assert head + keys(resumed) == full
    resumed.set_epoch(2)  # a new epoch starts from the beginning again
    assert len(keys(resumed)) == 60


def test_expand_shards_names_missing_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-"):
        ShardReader(str(tmp_path / "nothing-*.tar"))


# ------------------------------------------------------------------------------------------------ bad data


def raw_shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write members as given, bypassing the writer's validation."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def good(key: str) -> tuple[str, dict[str, bytes]]:
    png = io.BytesIO()
    noise_image(1).save(png, format="PNG")
    record = {"kind": "pair", "items": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "hi"}]}
    return key, {"json": json.dumps(record).encode(), "img0.png": png.getvalue()}


def with_json(key: str, record) -> tuple[str, dict[str, bytes]]:
    return key, {"json": json.dumps(record).encode()}


BAD_SAMPLES = {
    "json": [("broken", {"json": b"{not json"}), ("imageonly", {"img0.png": good("x")[1]["img0.png"]}),
             with_json("list", [1, 2])],
    "kind": [with_json("video", {"kind": "video", "items": []})],
    "field": [with_json("noitems", {"kind": "document"}),
              with_json("badtype", {"kind": "document", "items": [{"type": "audio", "audio": "a.wav"}]}),
              with_json("badrole", {"kind": "chat", "turns": [{"role": "robot", "content": []}]})],
    "image": [with_json("missingimg", {"kind": "pair", "items": [{"type": "image", "image": "img0.png"},
                                                                 {"type": "text", "text": "x"}]}),
              ("corrupt", {**good("x")[1], "img0.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10})],
}


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    bad = [s for group in BAD_SAMPLES.values() for s in group]
    shard = raw_shard(tmp_path / "mixed.tar", [good("first")] + bad + [good("last")])
    reader = ShardReader(shard, on_error="skip")
    assert keys(reader) == ["first", "last"]
    assert reader.errors == Counter({category: len(group) for category, group in BAD_SAMPLES.items()})
    assert "corrupt" in caplog.text and "mixed.tar" in caplog.text


@pytest.mark.parametrize("category, index", [(c, i) for c, group in BAD_SAMPLES.items() for i in range(len(group))])
def test_bad_sample_raises_naming_shard_and_key(tmp_path, category, index):
    key, members = BAD_SAMPLES[category][index]
    shard = raw_shard(tmp_path / "one.tar", [good("ok"), (key, members)])
    reader = ShardReader(shard, on_error="raise")
    it = iter(reader)
    assert next(it).key == "ok"
    with pytest.raises(DataError) as info:
        next(it)
    assert info.value.shard == shard and info.value.key == key and info.value.category == category
    assert shard in str(info.value) and repr(key) in str(info.value)


def test_truncated_shard_is_skipped_or_raised(tmp_path):
    path = write(str(tmp_path / "t-%03d.tar"), [Sample("pair", f"k{i}", items=[noise_image(i), "x"])
                                               for i in range(6)])[0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])
    reader = ShardReader(path)
    got = keys(reader)
    assert 0 < len(got) < 6 and got == [f"k{i}" for i in range(len(got))]
    assert reader.errors == Counter({"tar": 1})
    with pytest.raises(DataError, match="unreadable tar") as info:
        list(ShardReader(path, on_error="raise"))
    assert info.value.shard == path


# ------------------------------------------------------------------------------------------------- mixture


def test_mixture_proportions_converge_to_weights():
    mixture = Mixture([Source("a", range(7), 5, epochs=None), Source("b", range(11), 3, epochs=None),
                       Source("c", range(3), 2, epochs=None)], seed=1)
    names = Counter(name for name, _ in zip((n for n, _ in mixture), range(20000)))
    for name, share in mixture.proportions.items():
        assert abs(names[name] / 20000 - share) < 0.015


def test_mixture_epochs_and_stopping():
    sources = lambda: [Source("once", list("abc"), 1, epochs=1), Source("thrice", [1, 2], 1, epochs=3)]  # noqa
    drawn = list(Mixture(sources(), seed=0))
    assert Counter(name for name, _ in drawn) == {"once": 3, "thrice": 6}
    assert Counter(x for name, x in drawn if name == "thrice") == {1: 3, 2: 3}
    first = list(Mixture(sources(), seed=0, stop="first"))
    counts = Counter(name for name, _ in first)
    assert counts["once"] == 3 or counts["thrice"] == 6  # ended when one source ran out
    assert len(first) < 9


def test_mixture_is_deterministic_and_resumes_identically(tmp_path):
    shard_paths = write(str(tmp_path / "m-%05d.tar"), text_docs(30, "r"), max_count=5)

    def make(seed=4):
        return Mixture([Source("shards", ShardReader(shard_paths, shuffle=True, seed=2, shuffle_buffer=4), 1.0,
                               epochs=2),
                        Source("per_epoch", lambda epoch: [f"e{epoch}-{i}" for i in range(4)], 0.5, epochs=3),
                        Source("list", ["x", "y", "z"], 0.25, epochs=5)], seed=seed)

    def label(item):
        return item if isinstance(item, str) else item.key

    mixture = make()
    full = [(n, label(x)) for n, x in mixture]
    assert Counter(n for n, _ in full) == {"shards": 60, "per_epoch": 12, "list": 15}  # all epochs, then stop
    assert [x for n, x in full if n == "per_epoch"][4:8] == [f"e1-{i}" for i in range(4)]
    assert full == [(n, label(x)) for n, x in make()]
    assert full != [(n, label(x)) for n, x in make(seed=5)]

    mixture = make()
    it = iter(mixture)
    head = [(n, label(x)) for n, x in (next(it) for _ in range(41))]
    state = json.loads(json.dumps(mixture.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [(n, label(x)) for n, x in resumed] == full
