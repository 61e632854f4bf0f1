"""`alexnet show`: conv1 filters, fc7 nearest neighbours, feature maps; each checked
against a hand-written oracle (a double loop, F.conv2d, the LRN formula, a hooked
network fed by hand-made crops)."""

import math
import os
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexnet import cli
from alexnet.checkpoint import load_model_file, save_model
from alexnet.dataset import DataStats
from alexnet.model import build_model
from alexnet.plots import filter_grid
from alexnet.show import activations, add_command, map_grid, nearest, nearest_in_batches
from alexnet.sources import open_dataset

COPIES = {0: 5, 2: 13, 4: 22}  # test image -> the training image it is an exact copy of


def make_checkpoint(path, variant="paper", seed=0, scale=1.0, classes=("0", "1", "2")):
    torch.manual_seed(seed)
    model = build_model(variant, num_classes=3, init="kaiming")
    stats = DataStats(100 + 50 * torch.rand(3, 256, 256), torch.ones(3), torch.eye(3))
    save_model(path, model, list(classes), stats, {"image_size": 256, "crop": 227, "pixel_scale": scale})
    return path


def write_idx(folder, train_n=24, test_n=6, seed=0):
    """3 classes of 28x28 grey noise, each with a bright block in its own corner; some
    test images are exact copies of training images (COPIES)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for prefix, n in (("train", train_n), ("t10k", test_n)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 100, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 9 * c:9 * c + 10, 9 * c:9 * c + 10] += 150
        sets[prefix] = [images, labels]
    for q, t in COPIES.items():
        sets["t10k"][0][q] = sets["train"][0][t]
        sets["t10k"][1][q] = sets["train"][1][t]
    for prefix, (images, labels) in sets.items():
        n = len(images)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4B3I", 0, 0, 8, 3, n, 28, 28)
                                                              + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">4BI", 0, 0, 8, 1, n)
                                                              + labels.astype(np.uint8).tobytes())
    return folder


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "net.safetensors", scale=16.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((300, 260), Image.BICUBIC)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    small.save(path)
    return path


def parser():
    p = cli._Parser(prog="alexnet")
    add_command(p.add_subparsers(dest="command"))
    return p


def run(capsys, *argv):
    """`alexnet show ARGV` through cli.main (its error handling). Returns (code, out, err)."""
    with mock.patch.object(cli, "build_parser", parser):
        try:
            rc = cli.main(["show", *map(str, argv)])
        except SystemExit as e:
            rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_png(path):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.std() > 10, "blank picture"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, "too few colours"
    return img


@pytest.fixture(scope="module")
def oracle(ck, data):
    """fc7 after ReLU, float64, of uint8 (N, 3, 256, 256) images preprocessed by hand, from a
    network built from the file (plain layers, no fused blocks); and the training split's."""
    c = load_model_file(ck)
    model = c.build_model().eval()
    seen = []
    model.layer("fc7").register_forward_hook(lambda m, i, o: seen.append(o.relu().double()))

    def fc7(images):
        seen.clear()
        x = (images.float()[..., 14:241, 14:241] - c.stats.mean_image[:, 14:241, 14:241]) / 16.0
        with torch.no_grad():
            for part in x.split(8):
                model(part)
        return torch.cat(seen).numpy()

    train, _ = open_dataset(data, "train", 256).read(np.arange(24))
    return fc7, train, fc7(train)


def brute_force(queries, database, k):
    """Double loop: every distance, then sorted by (distance, index)."""
    out = []
    for q in np.asarray(queries, np.float64):
        d = [(math.sqrt(sum((a - b) ** 2 for a, b in zip(q, row))), j)
             for j, row in enumerate(np.asarray(database, np.float64))]
        out.append(sorted(d)[:k])
    return np.array([[d for d, _ in r] for r in out]), np.array([[j for _, j in r] for r in out])


# --- nearest neighbours ---------------------------------------------------------------------


def test_nearest_equals_brute_force_with_ties_and_duplicates():
    g = torch.Generator().manual_seed(0)
    db = torch.randint(-2, 3, (60, 5), generator=g).float()  # small integers: many equal distances
    db[40] = db[7]  # duplicate rows: equal distance to everything
    db[41] = db[7]
    q = torch.cat([torch.randint(-2, 3, (6, 5), generator=g).float(), db[7:8], torch.zeros(1, 5)])
    want_d, want_i = brute_force(q.numpy(), db.numpy(), 8)
    d, i = nearest(q, db, 8)
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-12)
    assert i[6, :3].tolist() == [7, 40, 41] and d[6, :3].tolist() == [0, 0, 0]
    # streamed in uneven batches: the same answer
    batches = [db[:13], db[13:14], db[14:41], db[41:]]
    d2, i2 = nearest_in_batches(q, batches, 8)
    assert torch.equal(i2, i) and torch.equal(d2, d)


def test_one_query_must_be_a_row():
    words = r"queries must be rows \(Q, D\), got a tensor of shape \(4,\); one query is q\[None\]"
    with pytest.raises(ValueError, match=words):
        nearest(torch.zeros(4), torch.zeros(3, 4), k=1)


def test_nearest_random_vectors_and_k_beyond_database():
    g = torch.Generator().manual_seed(1)
    db, q = 100 * torch.randn(30, 16, generator=g), 100 * torch.randn(4, 16, generator=g)
    q[3] = db[11]
    want_d, want_i = brute_force(q.numpy(), db.numpy(), 30)
    d, i = nearest_in_batches(q, db.split(7), 50)
    assert i.shape == (4, 30)
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-10)
    assert i[3, 0] == 11 and d[3, 0] == 0, "an exact copy is at distance 0, not a rounding error away"


def neighbour_indices(row):
    """'QUERY: train #J CLASS DIST, train #J ...' -> [J, ...]"""
    return [int(p.split()[0]) for p in row.split(": ", 1)[1].split("train #")[1:]]


def test_neighbours_command_finds_the_true_fc7_neighbours(capsys, ck, data, oracle, tmp_path):
    out = tmp_path / "nn.png"
    rc, text, err = run(capsys, "neighbours", ck, "--data", data, "--queries", 6, "--k", 4,
                        "--batch-size", 16, "--device", "cpu", "--out", out)
    assert rc == 0, err
    rows = [line for line in text.splitlines() if line.startswith("test #")]
    assert len(rows) == 6
    names = open_dataset(data, "test", 256).sources
    assert all(row.startswith(f"test #{i} ({names[i]}) ") for i, row in enumerate(rows)), rows
    chosen = np.array([neighbour_indices(row) for row in rows])
    fc7, _, train_fc7 = oracle
    test, _ = open_dataset(data, "test", 256).read(np.arange(6))
    want_d, want_i = brute_force(fc7(test), train_fc7, 4)
    np.testing.assert_array_equal(chosen, want_i)
    for q, t in COPIES.items():
        assert chosen[q, 0] == t
        assert want_d[q, 0] < 1e-3 * want_d[q, 1]
    img = read_png(out)
    assert img.shape == (6 * 190, 5 * 160, 3)  # one 160 x 190 px panel per image: query + 4


def test_neighbours_of_an_image_file_within_a_limited_search(capsys, ck, data, oracle, tmp_path):
    fc7, train, train_fc7 = oracle
    query = tmp_path / "copy.png"
    Image.fromarray(train[6].permute(1, 2, 0).numpy()).save(query)  # 256x256: resize and crop keep it
    out = tmp_path / "nn.png"
    rc, text, err = run(capsys, "neighbours", ck, "--data", data, "--images", query, "--limit", 8,
                        "--k", 3, "--device", "cpu", "--out", out)
    assert rc == 0, err
    row = text.splitlines()[0]
    chosen = neighbour_indices(row)
    searched = np.arange(0, 24, 3)  # 8 evenly spread of 24
    want_d, want_i = brute_force(fc7(train[6:7]), train_fc7[searched], 3)
    assert chosen == searched[want_i[0]].tolist() and chosen[0] == 6
    assert float(row.split(": ", 1)[1].split(", ")[0].split()[-1]) < 1e-3 * want_d[0, 1]
    assert read_png(out).shape == (190, 4 * 160, 3)


# --- filters -------------------------------------------------------------------------------


def test_filters_picture_has_one_block_per_gpu_group(capsys, ck, tmp_path):
    rc, text, err = run(capsys, "filters", ck)
    assert rc == 0, err
    path = ck.with_name("net-filters.png")
    img = read_png(path)
    # 96 kernels of 11x11 at zoom 4 (44 px), 16 to a row, 2 px gaps: 2 blocks of 3 rows, 8 px apart
    assert img.shape == (2 * (3 * 44 + 2 * 2) + 8, 16 * 44 + 15 * 2, 3)
    assert (img[136:144] == 255).all(), "white band between the two groups"
    w = load_model_file(ck).build_model().layer("conv1").weight
    assert np.array_equal(img, filter_grid(w, groups=2))


def test_filters_of_an_ungrouped_network_are_one_block(capsys, tmp_path):
    path = make_checkpoint(tmp_path / "u.safetensors", "paper-ungrouped")
    rc, _, err = run(capsys, "filters", path, "--out", tmp_path / "f.png")
    assert rc == 0, err
    assert read_png(tmp_path / "f.png").shape == (6 * 44 + 5 * 2, 16 * 44 + 15 * 2, 3)


# --- activations ---------------------------------------------------------------------------


def preprocessed(ck_path, photo):
    from alexnet.images import load_rgb, resize_center_crop

    c = load_model_file(ck_path)
    img = torch.from_numpy(resize_center_crop(load_rgb(photo), 256)).float()
    return c, ((img - c.stats.mean_image) / c.preprocess["pixel_scale"])[:, 14:241, 14:241]


def test_conv1_and_pool1_maps_equal_the_formulas(ck, photo):
    from alexnet.predict import Classifier

    c, x = preprocessed(ck, photo)
    model = Classifier.load(ck, "cpu").model  # channels_last, fused blocks: as the command runs it
    w, b = c.state_dict["features.0.weight"], c.state_dict["features.0.bias"]
    conv = F.conv2d(x[None], w, b, stride=4)[0]  # (96, 55, 55)
    torch.testing.assert_close(activations(model, x, "conv1"), conv, rtol=1e-4, atol=1e-4)
    a = conv.relu()
    # section 3.3: a / (k + alpha * sum of squares over 5 neighbouring maps) ** beta, then 3x3/2 max-pool
    sq = F.pad(a.square()[None, None], (0, 0, 0, 0, 2, 2))[0, 0]
    denom = (2 + 1e-4 * sum(sq[i:i + 96] for i in range(5))) ** 0.75
    pool = F.max_pool2d((a / denom)[None], 3, 2)[0]  # (96, 27, 27)
    torch.testing.assert_close(activations(model, x, "pool1"), pool, rtol=1e-4, atol=1e-4)


def test_feature_helpers_give_the_model_back_as_they_found_it(ck, photo):
    """A model in training mode (a notebook's training loop) is read in eval mode and left
    in training mode, with no hook left on it, also by a features generator given up
    after its first batch; a batch given as one image, or one image as a batch, is named."""
    from alexnet.predict import Classifier
    from alexnet.show import features

    c, x = preprocessed(ck, photo)
    model = Classifier.load(ck, "cpu").model
    want = activations(model, x, "relu7")
    model.train()
    torch.testing.assert_close(activations(model, x, "relu7"), want)  # no dropout: eval mode
    gen = features(model, [x[None], x[None]])
    torch.testing.assert_close(next(gen)[0], want)
    assert model.training and not model.layer("relu7")._forward_hooks
    with pytest.raises(ValueError, match=r"one image \(3, H, W\), got a tensor of shape \(1, 3, 227, 227\)"):
        activations(model, x[None], "conv1")
    with pytest.raises(ValueError, match=r"batches \(B, 3, H, W\), got a tensor of shape \(3, 227, 227\)"):
        next(features(model, [x]))


def test_map_grid_places_maps_on_one_shared_scale():
    maps = torch.randn(10, 4, 5)
    grid, (lo, hi) = map_grid(maps)  # 4 to a row, 3 rows
    assert grid.shape == (3 * 5 - 1, 4 * 6 - 1) and (lo, hi) == (maps.min().item(), maps.max().item())
    want = (maps[6].double() - lo) / (hi - lo)  # row 1, column 2
    np.testing.assert_allclose(grid[5:9, 12:17], want.numpy())
    assert (grid[4] == 1).all() and (grid[10:, 12:] == 1).all(), "white gaps and empty places"


def test_activations_command_pictures(capsys, ck, photo, tmp_path):
    rc, text, err = run(capsys, "activations", ck, photo)
    assert rc == 0, err
    assert "conv1 (96, 55, 55)" in text
    assert read_png(ck.with_name("net-conv1-photo.png.png")).shape == (850, 800, 3)  # 10 x 10 maps of 80 px
    jpeg = tmp_path / "photo.jpg"  # the same stem: its own picture (it overwrote photo.png's)
    Image.open(photo).save(jpeg, quality=90)
    before = ck.with_name("net-conv1-photo.png.png").read_bytes()
    assert run(capsys, "activations", ck, jpeg)[0] == 0
    assert ck.with_name("net-conv1-photo.jpg.png").is_file()
    assert ck.with_name("net-conv1-photo.png.png").read_bytes() == before
    rc, text, err = run(capsys, "activations", ck, photo, "--layer", "conv3", "--max-maps", 400,
                        "--out", tmp_path / "c3.png")
    assert rc == 0, err
    assert read_png(tmp_path / "c3.png").shape == (1650, 1600, 3)  # 384 maps: 20 x 20
    rc, text, err = run(capsys, "activations", ck, photo, "--layer", "pool5", "--out", tmp_path / "p5.png")
    assert rc == 0, err
    assert "first 96 of 256 maps" in text
    assert read_png(tmp_path / "p5.png").shape == (850, 800, 3)
    # a few maps: the picture is 600 pixels wide, the grid centred under a title that fits
    # (it was 160 pixels, the title cut off at both sides)
    rc, text, err = run(capsys, "activations", ck, photo, "--layer", "norm1", "--max-maps", 4,
                        "--out", tmp_path / "n4.png")
    assert rc == 0, err
    picture = read_png(tmp_path / "n4.png")
    assert picture.shape == (210, 600, 3)  # 2 x 2 maps of 80 pixels and the 50-pixel title band
    dark = (picture[:50].astype(int).sum(2) < 384).any(0).nonzero()[0]  # the title's ink, column by column
    assert dark.min() > 0 and dark.max() < 599, "the title is inside the picture"
    assert (picture[50:, :219] == 255).all() and (picture[50:, 381:] == 255).all()  # white beside the grid
    # a file name that is not UTF-8: drawn and printed as \xff (it was matplotlib's TypeError)
    odd = tmp_path / os.fsdecode(b"odd-\xff.png")
    odd.write_bytes(Path(photo).read_bytes())
    rc, text, err = run(capsys, "activations", ck, odd, "--max-maps", 4, "--out", tmp_path / "odd.png")
    assert rc == 0 and "conv1 (96, 55, 55) of odd-\\xff.png: first 4 of 96 maps" in text, err
    assert read_png(tmp_path / "odd.png").shape == (210, 600, 3)


# --- user errors -------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(capsys, ck, data, photo, tmp_path, monkeypatch):
    (tmp_path / "bad.png").write_text("not an image")
    monkeypatch.setenv("HOME", str(Path(data).parent))
    cases = [
        (("activations", ck, photo, "--layer", "fc7"), "unknown layer 'fc7'"),
        (("activations", ck, photo, "--layer", "conv9"), "unknown layer 'conv9'"),
        (("activations", ck, photo, "--layer", "conv9/"), "unknown layer 'conv9/'"),  # was a traceback
        (("activations", tmp_path / "none.safetensors", photo), "no checkpoint file"),
        (("filters", tmp_path / "none.safetensors"), "no checkpoint file"),
        (("activations", ck, tmp_path / "bad.png"), "bad.png: not an image"),
        (("activations", ck, tmp_path / "missing.png"), "missing.png: cannot open"),
        (("neighbours", ck, "--data", data, "--images", tmp_path / "bad.png", "--device", "cpu"),
         "bad.png: not an image"),
        (("neighbours", ck, "--data", tmp_path / "nowhere", "--device", "cpu"), "not found"),
        # a picture inside the data folder could replace one of its images (it did)
        (("neighbours", ck, "--data", data, "--out", data / "x.png", "--device", "cpu"),
         "is inside the data folder"),
        (("neighbours", ck, "--data", f"~/{Path(data).name}", "--out", data / "x.png", "--device", "cpu"),
         "is inside the data folder"),  # (--data=~/x: the shell leaves the ~; the check missed it)
    ]
    for argv, message in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert err.startswith("alexnet: error: ") and message in err and err.count("\n") == 1, err


def test_no_picture_replaces_an_input_and_a_bad_output_is_refused_before_any_work(capsys, ck, data, photo,
                                                                                    tmp_path):
    model, image = tmp_path / "net.safetensors", tmp_path / "photo.png"
    model.write_bytes(ck.read_bytes())
    image.write_bytes(photo.read_bytes())
    before = model.read_bytes(), image.read_bytes()
    long_named = tmp_path / ("x" * 245 + ".png")
    long_named.write_bytes(photo.read_bytes())
    nowhere = tmp_path / "nowhere"  # were the data opened first, this would be the error
    cases = [
        (("filters", model, "--out", model), "is the input"),
        (("activations", model, image, "--out", image), "is the input"),
        (("neighbours", model, "--data", data, "--images", image, "--out", image, "--device", "cpu"),
         "is the input"),
        (("neighbours", model, "--data", nowhere, "--out", tmp_path, "--device", "cpu"), "is a folder"),
        (("neighbours", model, "--data", nowhere, "--out", image / "x.png", "--device", "cpu"),
         "is not a writable folder"),
        (("filters", nowhere / "none.safetensors", "--out", tmp_path), "is a folder"),
        (("filters", model, "--out", tmp_path / "f.jpg"), "this writes a PNG picture; give a name ending in "
                                                          ".png"),
        (("activations", model, image, "--out", tmp_path / "a"), "ending in .png"),
        (("activations", nowhere / "none.safetensors", image, "--out", tmp_path), "is a folder"),  # (no model read)
        (("neighbours", model, "--data", nowhere, "--images", image, "--queries", "3", "--query-split", "val"),
         "--queries and --query-split choose queries from the data; --images gives them"),
        (("neighbours", model, "--data", nowhere, "--images", image, "--queries", "3"), "--queries chooses"),
        # a valid image name whose default picture name (checkpoint-layer-image.png) is too long
        (("activations", model, long_named), "bytes, longer than the 255 the file system allows"),
        (("filters", model, "--out", tmp_path / ("y" * 252 + ".png")), "256 bytes, longer than the 255"),
    ]
    for argv, message in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert (model.read_bytes(), image.read_bytes()) == before


def test_a_class_list_other_than_the_checkpoints_names_where_they_differ(capsys, data, tmp_path):
    ck = make_checkpoint(tmp_path / "abc.safetensors", classes=("0", "x", "2"))
    rc, _, err = run(capsys, "neighbours", ck, "--data", data, "--device", "cpu", "--out", tmp_path / "n.png")
    assert rc == 2 and "class #1 is '1' there and 'x' in the checkpoint" in err and err.count("\n") == 1, err


def test_unreadable_files_are_neither_neighbours_nor_queries(capsys, ck, tmp_path):
    """An ImageFolder with a file that does not decode in the searched split and in the
    query split: it is left out of both (the loader would otherwise stand its neighbour
    in for it, under its own index and label)."""
    rng = np.random.default_rng(5)
    for split in ("train", "test"):
        for c in range(3):
            folder = tmp_path / "tree" / split / str(c)
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (tmp_path / "tree" / split / "1" / "bad.png").write_text("not an image")  # index 6 of 10
    with pytest.warns(RuntimeWarning, match=r"unreadable image 1/bad.png \(not an image .*\); left out"):
        rc, text, err = run(capsys, "neighbours", ck, "--data", tmp_path / "tree", "--queries", 10, "--k", 20,
                            "--device", "cpu", "--out", tmp_path / "nn.png")
    assert rc == 0, err
    rows = [line for line in text.splitlines() if line.startswith("test #")]
    assert [int(r.split()[1][1:]) for r in rows] == [0, 1, 2, 3, 4, 5, 7, 8, 9], rows
    for row in rows:
        assert sorted(neighbour_indices(row)) == [0, 1, 2, 3, 4, 5, 7, 8, 9], row
    assert "9 nearest of 9 train images by fc7 distance, 1 unreadable query and 1 unreadable train image left out" in text
    assert read_png(tmp_path / "nn.png").shape == (9 * 190, 10 * 160, 3)
