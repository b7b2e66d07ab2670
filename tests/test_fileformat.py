"""The compressed file format: bit packing, round trips, size, and every way a file can be bad."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
import sys
import types

import pytest
import torch
import torchvision
from torch import nn

from bgd_dist import fileformat
from bgd_dist.core.kmeans import Codebook
from bgd_dist.core.sizing import size_report
from bgd_dist.fileformat import (
    FormatError,
    format_inspect,
    inspect_file,
    load_compressed,
    pack_indexes,
    packed_bits,
    packed_nbytes,
    read_header,
    register_factory_prefix,
    save_compressed,
    unpack_indexes,
)
from bgd_dist.nn.modules import PQLayer, pq_layers, quantize_
from bgd_dist.plan import Rule, build_plan

ARCH18 = {"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 1000}}
SMALL_RULES = [
    Rule("conv1", skip=True),
    Rule("fc", block_size=4, n_centroids=2048),
    Rule(r".*", kind="conv2d", kernel=(3, 3), block_size=9),
    Rule(r".*", kind="conv2d", kernel=(1, 1), block_size=4),
]


# ----------------------------------------------------------------------------- helpers

def random_student(rules, seed: int = 0, arch=torchvision.models.resnet18):
    """A torchvision model (weights=None) with random BN statistics, quantized with random codebooks."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = arch(weights=None).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=gen)
            m.running_mean = 0.1 * torch.randn(m.num_features, generator=gen)
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
    plan = build_plan(model, rules, run=lambda m: m(torch.zeros(1, 3, 32, 32)))
    codebooks = {
        l.name: Codebook(0.05 * torch.randn(l.n_centroids, l.block_size, generator=gen),
                         torch.randint(l.n_centroids, (l.n_subvectors,), generator=gen), ())
        for l in plan.quantized
    }
    return quantize_(model, plan, codebooks), plan


def fp16_rounded_state(model: nn.Module) -> dict:
    """The model's state with centroids rounded to fp16 (what the file keeps)."""
    pq = set(pq_layers(model))
    return {k: (v.half().float() if k.endswith(".centroids") and k[: -len(".centroids")] in pq else v)
            for k, v in model.state_dict().items()}


def rewrite_header(path, edit) -> None:
    """Apply ``edit(header_dict)`` to a file's JSON header, keeping the prefix consistent."""
    data = path.read_bytes()
    magic, version, reserved, hlen, _ = struct.unpack("<8sIIQ32s", data[:56])
    header = json.loads(data[56:56 + hlen])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-(56 + len(hb)) % 8)
    path.write_bytes(struct.pack("<8sIIQ32s", magic, version, reserved, len(hb), hashlib.sha256(hb).digest())
                     + hb + data[56 + hlen:])


def reference_pack(values: list[int], bits: int) -> bytes:
    """Slow, obviously correct LSB-first bit stream."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    return stream.to_bytes(packed_nbytes(len(values), bits), "little")


@pytest.fixture(scope="module")
def student():
    return random_student(SMALL_RULES)


@pytest.fixture(scope="module")
def saved(student, tmp_path_factory):
    model, plan = student
    path = tmp_path_factory.mktemp("bgd") / "model.bgd"
    nbytes = save_compressed(path, model, plan, ARCH18, metadata={"top1": 12.5, "note": "random"})
    assert nbytes == path.stat().st_size
    return path


@pytest.fixture
def copy_of(saved, tmp_path):
    def make(name="copy.bgd"):
        p = tmp_path / name
        p.write_bytes(saved.read_bytes())
        return p
    return make


# ----------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("n_centroids,bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (255, 8), (256, 8),
                                              (257, 9), (1024, 10), (2048, 11), (65536, 16)])
def test_packed_bits_is_ceil_log2(n_centroids, bits):
    assert packed_bits(n_centroids) == bits
    assert bits == (0 if n_centroids == 1 else math.ceil(math.log2(n_centroids)))


@pytest.mark.parametrize("bits", range(1, 17))
def test_bitpack_round_trip_property(bits):
    gen = torch.Generator().manual_seed(bits)
    for count in [0, 1, 2, 7, 8, 9, 15, 17, 63, 64, 65] + torch.randint(1, 5000, (5,), generator=gen).tolist():
        idx = torch.randint(2 ** bits, (count,), generator=gen)
        packed = pack_indexes(idx, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (packed_nbytes(count, bits),)
        assert packed.numel() == math.ceil(count * bits / 8)
        assert torch.equal(unpack_indexes(packed, bits, count), idx)


@pytest.mark.parametrize("bits", list(range(1, 17)) + [20, 24, 31, 32])
def test_bitpack_matches_reference_bit_stream(bits):
    gen = torch.Generator().manual_seed(100 + bits)
    idx = torch.randint(2 ** bits, (37,), generator=gen, dtype=torch.int64)
    expected = reference_pack(idx.tolist(), bits)
    packed = pack_indexes(idx, bits)
    assert bytes(packed.tolist()) == expected
    assert torch.equal(unpack_indexes(packed, bits, 37), idx)


def test_bitpack_extremes_and_dtypes():
    for bits in (1, 5, 8, 11, 16):
        top = 2 ** bits - 1
        idx = torch.tensor([0, top, top, 0, top, 1])
        for dtype in (torch.int64, torch.int32):
            assert torch.equal(unpack_indexes(pack_indexes(idx.to(dtype), bits), bits, 6), idx)
    assert torch.equal(unpack_indexes(pack_indexes(torch.tensor([1, 0, 1], dtype=torch.uint8), 1), 1, 3),
                       torch.tensor([1, 0, 1]))


def test_bitpack_zero_bits_stores_nothing():
    packed = pack_indexes(torch.zeros(1000, dtype=torch.long), 0)
    assert packed.numel() == 0
    assert torch.equal(unpack_indexes(packed, 0, 1000), torch.zeros(1000, dtype=torch.long))


def test_bitpack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_indexes(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_indexes(torch.tensor([-1, 2]), 3)
    with pytest.raises(TypeError):
        pack_indexes(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_indexes(torch.zeros(3, dtype=torch.uint8), 3, 5)


def test_swap_bytes_round_trip():
    t = torch.tensor([0x01020304], dtype=torch.int32)
    assert fileformat._swap_bytes(t).item() == 0x04030201
    x = torch.randn(3, 5)
    assert torch.equal(fileformat._swap_bytes(fileformat._swap_bytes(x)), x)


# ----------------------------------------------------------------------------- round trip

def test_round_trip_identical_state_and_outputs(student, saved):
    model, plan = student
    loaded = load_compressed(saved)
    assert not loaded.training
    assert set(pq_layers(loaded)) == {l.name for l in plan.quantized}
    expected = fp16_rounded_state(model)
    got = loaded.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    # BN running statistics and counters survive
    assert torch.equal(loaded.layer3[1].bn2.running_var, model.layer3[1].bn2.running_var)
    assert loaded.bn1.num_batches_tracked.item() == model.bn1.num_batches_tracked.item() > 0
    # the in-memory student with fp16-rounded centroids computes exactly the same function
    reference = copy.deepcopy(model)
    reference.load_state_dict(expected)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        assert torch.equal(loaded.fc.weight, reference.fc.weight)


def test_loaded_centroids_are_trainable_fp32(saved):
    loaded = load_compressed(saved)
    layer = loaded.get_submodule("layer2.0.conv1")
    assert isinstance(layer, PQLayer)
    assert layer.centroids.dtype == torch.float32 and layer.centroids.requires_grad
    assert layer.assignments.dtype == torch.int64
    loaded(torch.randn(1, 3, 32, 32)).sum().backward()
    assert layer.centroids.grad is not None


def test_odd_numbers_of_centroids_round_trip(tmp_path):
    rules = [Rule("conv1", skip=True), Rule("layer1.0.conv1", block_size=9, n_centroids=1),
             Rule("layer1.0.conv2", block_size=9, n_centroids=3), Rule("layer1.1.conv1", block_size=18,
                                                                         n_centroids=100),
             Rule("fc", block_size=8, n_centroids=1000), Rule(r"layer4\..*", skip=True)] + SMALL_RULES[2:]
    model, plan = random_student(rules, seed=3)
    model.layer1[0].bn1.running_var = model.layer1[0].bn1.running_var.double()  # dtypes are kept
    path = tmp_path / "odd.bgd"
    save_compressed(path, model, plan, ARCH18)
    tensors = read_header(path)["tensors"]
    assert tensors["layer1.0.conv1.assignments"]["bits"] == 0
    assert tensors["layer1.0.conv1.assignments"]["nbytes"] == 0
    assert tensors["layer1.0.conv2.assignments"]["bits"] == 2
    assert tensors["layer1.1.conv1.assignments"]["bits"] == 7
    assert tensors["fc.assignments"]["bits"] == 10
    loaded = load_compressed(path)
    expected = fp16_rounded_state(model)
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert loaded.layer1[0].bn1.running_var.dtype == torch.float64
    assert not isinstance(loaded.layer4[0].conv1, PQLayer)


def test_on_disk_size_close_to_accounted_size(student, saved):
    model, plan = student
    accounted = size_report(model, plan).compressed_bytes
    on_disk = saved.stat().st_size
    assert accounted < on_disk <= 1.01 * accounted + 64 * 1024
    assert abs(accounted / 2 ** 20 - 1.54) < 0.005  # METHOD §5: ResNet-18 small is 1.54 MB


def test_header_inspect_and_table(student, saved):
    model, plan = student
    header = read_header(saved)
    assert header["format"] == "bgd-model" and header["version"] == fileformat.FORMAT_VERSION
    assert header["arch"] == ARCH18
    assert header["metadata"] == {"top1": 12.5, "note": "random"}
    assert header["plan"] == plan.to_dict()
    assert header["tensors"]["fc.centroids"]["dtype"] == "float16"
    assert header["tensors"]["fc.assignments"]["bits"] == 11
    info = inspect_file(saved)
    json.dumps(info)  # plain data
    assert info["file_nbytes"] == saved.stat().st_size
    assert info["accounted_nbytes"] == pytest.approx(size_report(model, plan).compressed_bytes)
    assert info["ratio"] == pytest.approx(size_report(model, plan).ratio)
    fc = next(l for l in info["layers"] if l["name"] == "fc")
    assert (fc["block_size"], fc["n_centroids"], fc["index_bits"]) == (4, 2048, 11)
    assert fc["nbytes"] == 2048 * 4 * 2 + math.ceil(128000 * 11 / 8)
    conv1 = info["layers"][0]
    assert conv1["skip"] and conv1["nbytes"] == 64 * 3 * 7 * 7 * 4 and conv1["bits_per_weight"] == 32
    assert sum(l["nbytes"] for l in info["layers"]) + info["other_nbytes"] <= info["payload_nbytes"]
    text = format_inspect(info)
    assert "layer4.1.conv2" in text and "2048" in text and "accounted" in text and "28.9x" in text


class Tiny(nn.Module):
    """A small model with optional state outside the state_dict."""

    def __init__(self, plain_tensor: bool = False, non_persistent: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.scale = [torch.tensor(2.0)] if plain_tensor else None       # plain attribute, not a buffer
        if non_persistent:
            self.register_buffer("offset", torch.full((4,), 0.5), persistent=False)

    def forward(self, x):
        y = self.fc(self.bn(self.conv(x)).mean((2, 3)))
        if self.scale is not None:
            y = y * self.scale[0]
        if hasattr(self, "offset"):
            y = y + self.offset
        return y


@pytest.mark.parametrize("plain_tensor,non_persistent", [(False, False), (True, False), (False, True)])
def test_state_outside_the_state_dict_survives_loading(tmp_path, monkeypatch, plain_tensor, non_persistent):
    monkeypatch.setattr(fileformat, "_factory_prefixes", list(fileformat.DEFAULT_FACTORY_PREFIXES))
    factories = types.ModuleType("tiny_models")
    factories.Tiny = Tiny
    monkeypatch.setitem(sys.modules, "tiny_models", factories)
    register_factory_prefix("tiny_models")
    torch.manual_seed(0)
    model = Tiny(plain_tensor, non_persistent).eval()
    model.bn.running_mean.normal_()
    plan = build_plan(model, [Rule("conv", block_size=9, n_centroids=4), Rule("fc", block_size=4)],
                      run=lambda m: m(torch.zeros(1, 3, 8, 8)))
    assert plan.layer("fc").n_centroids == 1  # clamp rule: 8 subvectors
    quantize_(model, plan, {l.name: Codebook(torch.randn(l.n_centroids, l.block_size),
                                             torch.randint(l.n_centroids, (l.n_subvectors,)), ())
                            for l in plan.quantized})
    arch = {"factory": "tiny_models:Tiny", "kwargs": {"plain_tensor": plain_tensor, "non_persistent": non_persistent}}
    save_compressed(tmp_path / "tiny.bgd", model, plan, arch)
    loaded = load_compressed(tmp_path / "tiny.bgd")
    model.load_state_dict(fp16_rounded_state(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("keep", ["half_payload", "one_byte_short", "in_header", "in_prefix", "in_magic"])
def test_truncated_file(copy_of, keep):
    path = copy_of()
    data = path.read_bytes()
    hlen = struct.unpack("<Q", data[16:24])[0]
    cut = {"half_payload": (56 + hlen + len(data)) // 2, "one_byte_short": len(data) - 1,
           "in_header": 56 + hlen // 2, "in_prefix": 30, "in_magic": 5}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(FormatError, match="truncated") as err:
        load_compressed(path)
    assert str(path) in str(err.value)
    if keep in ("half_payload", "one_byte_short"):
        assert f"expected {len(data)} bytes" in str(err.value) and f"got {cut}" in str(err.value)


def test_trailing_bytes_are_rejected(copy_of):
    path = copy_of()
    path.write_bytes(path.read_bytes() + b"\0" * 3)
    with pytest.raises(FormatError, match="3 unexpected trailing bytes"):
        load_compressed(path)


@pytest.mark.parametrize("where", ["payload_start", "payload_end", "payload_middle", "header"])
def test_corrupted_byte_fails_checksum(copy_of, where):
    path = copy_of()
    data = bytearray(path.read_bytes())
    hlen = struct.unpack("<Q", data[16:24])[0]
    pos = {"payload_start": 56 + hlen, "payload_end": len(data) - 1,
           "payload_middle": (56 + hlen + len(data)) // 2, "header": 56 + hlen // 3}[where]
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum") as err:
        load_compressed(path)
    assert str(path) in str(err.value)


def test_foreign_files(tmp_path):
    pth = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), pth)
    with pytest.raises(FormatError, match="not a bgd file.*torch.save") as err:
        load_compressed(pth)
    assert str(pth) in str(err.value)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(FormatError, match="not a bgd file"):
        load_compressed(noise)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model\n" * 10)
    with pytest.raises(FormatError, match="not a bgd file"):
        read_header(text)
    empty = tmp_path / "empty.bgd"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="not a bgd file.*empty"):
        load_compressed(empty)
    with pytest.raises(FileNotFoundError, match="missing.bgd"):
        load_compressed(tmp_path / "missing.bgd")


def test_future_version_is_refused(copy_of):
    path = copy_of()
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", fileformat.FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    msg = (f"format version {fileformat.FORMAT_VERSION + 1} is newer than this reader supports "
           f"({fileformat.FORMAT_VERSION}); upgrade bgd-dist")
    with pytest.raises(FormatError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_compressed(path)
    with pytest.raises(FormatError, match="newer"):
        read_header(path)


def test_factory_outside_allow_list_is_refused(copy_of, student, tmp_path):
    model, plan = student
    path = copy_of()
    rewrite_header(path, lambda h: h.update(arch={"factory": "os:system", "kwargs": {"command": "true"}}))
    with pytest.raises(FormatError, match="allow-list") as err:
        load_compressed(path)
    assert str(path) in str(err.value) and "os:system" in str(err.value)
    with pytest.raises(FormatError, match="allow-list"):
        save_compressed(tmp_path / "x.bgd", model, plan, {"factory": "os:system", "kwargs": {}})
    assert not (tmp_path / "x.bgd").exists()
    for bad in ({"factory": "torchvision.models.resnet18"}, {"factory": "torchvision.models:_private"},
                {"factory": "torchvision.models:resnet18", "kwargs": {"x": object()}},
                {"factory": "torchvision.models:resnet18", "weights": "IMAGENET1K_V1"}):
        with pytest.raises(FormatError):
            save_compressed(tmp_path / "x.bgd", model, plan, bad)


def test_registered_factory_prefix(monkeypatch, tmp_path, student):
    model, plan = student
    monkeypatch.setattr(fileformat, "_factory_prefixes", list(fileformat.DEFAULT_FACTORY_PREFIXES))
    arch = {"factory": "torchvision.models.resnet:resnet18", "kwargs": {}}
    save_compressed(tmp_path / "a.bgd", model, plan, arch)  # sub-module of an allowed prefix
    factories = types.ModuleType("my_factories")
    factories.make_resnet18 = lambda: torchvision.models.resnet18(weights=None)
    monkeypatch.setitem(sys.modules, "my_factories", factories)
    arch = {"factory": "my_factories:make_resnet18", "kwargs": {}}
    with pytest.raises(FormatError, match="allow-list"):
        save_compressed(tmp_path / "b.bgd", model, plan, arch)
    register_factory_prefix("my_factories")
    save_compressed(tmp_path / "b.bgd", model, plan, arch)
    assert torch.equal(load_compressed(tmp_path / "b.bgd").fc.weight, load_compressed(tmp_path / "a.bgd").fc.weight)
    with pytest.raises(ValueError):
        register_factory_prefix("not a module")


def test_state_mismatch_names_keys(copy_of):
    path = copy_of()

    def rename(h):
        h["tensors"] = {("bn1.running_meen" if k == "bn1.running_mean" else k): v for k, v in h["tensors"].items()}
    rewrite_header(path, rename)
    with pytest.raises(FormatError, match=r"missing keys \['bn1.running_mean'\].*unexpected keys "
                                          r"\['bn1.running_meen'\]"):
        load_compressed(path)


def test_wrong_kwargs_and_inconsistent_table(copy_of):
    path = copy_of()
    rewrite_header(path, lambda h: h["arch"]["kwargs"].update(num_classes=10))
    with pytest.raises(FormatError, match=r"layer 'fc': architecture .*num_classes.: 10.*the plan says"):
        load_compressed(path)
    path = copy_of("b.bgd")
    rewrite_header(path, lambda h: h["tensors"]["fc.bias"].update(nbytes=3))
    with pytest.raises(FormatError, match="corrupt header: tensor 'fc.bias'"):
        load_compressed(path)


# ----------------------------------------------------------------------------- saving

def test_save_requires_every_planned_layer_quantized(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    plan = build_plan(model, SMALL_RULES)
    with pytest.raises(FormatError, match="'layer1.0.conv1' is quantized in the plan but the model has Conv2d"):
        save_compressed(tmp_path / "m.bgd", model, plan, ARCH18)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_file_and_keeps_old_one(student, tmp_path, monkeypatch):
    model, plan = student

    def broken_fsync(fd):
        raise OSError("disk on fire")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        save_compressed(tmp_path / "model.bgd", model, plan, ARCH18)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model.bgd").write_bytes(b"old")
    with pytest.raises(OSError, match="disk on fire"):
        save_compressed(tmp_path / "model.bgd", model, plan, ARCH18)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bgd"]
    assert (tmp_path / "model.bgd").read_bytes() == b"old"


def test_centroids_overflowing_fp16_are_refused(tmp_path):
    model, plan = random_student(SMALL_RULES, seed=5)
    with torch.no_grad():
        model.layer2[0].conv2.centroids[3, 0] = 1e6
    with pytest.raises(FormatError, match="layer2.0.conv2.*float16"):
        save_compressed(tmp_path / "m.bgd", model, plan, ARCH18)
    assert list(tmp_path.iterdir()) == []
