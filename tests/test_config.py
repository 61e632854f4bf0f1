"""The config: paper defaults, round trips, and clear errors."""

import json
import re

import pytest

from alexnet.config import ConfigError, LRNConfig, ModelConfig, from_dict, model_config, to_dict


def test_defaults_are_the_papers():
    c = ModelConfig()
    assert (c.variant, c.num_classes, c.input_size, c.dropout, c.init_std) == ("paper", 1000, 227, 0.5, 0.01)
    assert (c.lrn.size, c.lrn.alpha, c.lrn.beta, c.lrn.k, c.lrn.form) == (5, 1e-4, 0.75, 2.0, "paper")
    assert set(c.init_bias_one) == {"conv2", "conv4", "conv5", "fc6", "fc7"}
    assert c.conv1_padding == 0 and model_config(input_size=224).conv1_padding == 2
    assert model_config("owt").input_size == 224


def test_training_and_data_defaults_are_section_5s_and_4_1s():
    import torch

    from alexnet.config import run_config
    from alexnet.train import make_optimizer

    cfg = run_config("paper")
    t, d = cfg.train, cfg.data
    assert (t.batch_size, t.lr, t.momentum, t.weight_decay, t.epochs) == (128, 0.01, 0.9, 5e-4, 90)
    assert (t.schedule, t.lr_drop, t.max_lr_drops) == ("plateau", 0.1, 3)
    assert (t.warmup_steps, t.label_smoothing, t.grad_clip) == (0, 0.0, 0.0)  # none of these in the paper
    assert (d.image_size, d.lighting_std, d.flip) == (256, 0.1, True)
    # the update of section 5: v <- 0.9 v - 0.0005 lr w - lr grad, so no dampening, no Nesterov
    group = make_optimizer(torch.nn.Linear(2, 2), t, torch.device("cpu")).param_groups[0]
    assert {k: group[k] for k in ("lr", "momentum", "weight_decay", "dampening", "nesterov")} == {
        "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "dampening": 0, "nesterov": False}


def test_alpha_of_the_two_lrn_forms():
    assert LRNConfig().alpha_sum == 1e-4
    assert LRNConfig(form="caffe", k=1.0).alpha_sum == pytest.approx(1e-4 / 5)


def test_round_trip_through_json():
    c = model_config("bn", num_classes=10, lrn=LRNConfig(form="caffe", k=1.0))
    back = from_dict(ModelConfig, json.loads(json.dumps(to_dict(c))))
    assert back == c


@pytest.mark.parametrize("data, message", [
    ({"varaint": "paper"}, "unknown key varaint"),
    ({"lrn": {"sise": 5}}, "unknown key lrn.sise"),
    ({"num_classes": "10"}, "num_classes must be an integer"),
    ({"num_classes": True}, "num_classes must be an integer"),
    ({"dropout": "half"}, "dropout must be a number"),
    ({"variant": "vgg"}, "variant must be one of"),
    ({"lrn": {"form": "torch"}}, "lrn.form must be one of"),
    ({"lrn": 5}, "^lrn must be a mapping, not int$"),
    ({"input_size": 225}, "input size must be 224 or 227"),
    ({"num_classes": 0}, "num_classes must be >= 1"),
    ({"fc_width": 0}, "fc_width must be >= 1, not 0"),
    ({"fc_width": 4096.0}, "fc_width must be an integer"),
    ({"lrn": {"size": 4}}, "positive odd"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"dropout_form": "scaled"}, "dropout_form must be one of"),
])
def test_bad_values_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, data)


@pytest.mark.parametrize("kwargs, message", [
    ({"init": "he"}, "init must be one of paper, kaiming, not 'he'"),  # was the paper's init, silently
    ({"lrn": {"k": 1.0}}, "lrn must be an LRNConfig, not {'k': 1.0}"),  # was an error in forward
    ({"num_classes": 10.0}, "num_classes must be an integer, not 10.0"),
    ({"num_classes": True}, "num_classes must be an integer, not True"),
    ({"input_size": "227"}, "input_size must be an integer, not '227'"),
    ({"dropout": "0.5"}, "dropout must be a number, not '0.5'"),
    ({"fc_width": 4096.0}, "fc_width must be an integer, not 4096.0"),
    ({"init_std": "0.01"}, "init_std must be a number, not '0.01'"),
    # non-finite numbers, which a config file's check refuses, built a network of NaNs
    ({"init_std": float("nan")}, "init_std must be a finite number, not nan"),
    ({"lrn": "beta=nan"}, "lrn.beta must be a finite number, not nan"),
    ({"lrn": "k=inf"}, "lrn.k must be a finite number, not inf"),
])
def test_keyword_arguments_in_python_are_checked_as_a_config_file_is(kwargs, message):
    from alexnet import build_model

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        if isinstance(kwargs.get("lrn"), str):  # an LRNConfig made with that keyword
            key, value = kwargs["lrn"].split("=")
            kwargs = {"lrn": LRNConfig(**{key: float(value)})}
        build_model("paper", **kwargs)


@pytest.mark.parametrize("size", [5.0, True, "5", 4, 0])
def test_lrn_size_from_python_must_be_a_positive_odd_integer(size):
    """LRNConfig(size=5.0) was taken and failed in the first forward pass (a ctypes error in
    the kernel); True was taken as n = 1."""
    with pytest.raises(ConfigError, match=f"^lrn.size must be a positive odd integer, not {re.escape(repr(size))}$"):
        LRNConfig(size=size)


def test_owt_from_python_is_torchvisions_module():
    """build_model("owt") takes a torchvision state dict as it is and gives its outputs:
    224 input and nn.Dropout's inverted form (reference.plain_alexnet is the oracle)."""
    import torch

    from alexnet import build_model
    from alexnet.reference import plain_alexnet

    torch.manual_seed(0)
    tv = plain_alexnet("owt", num_classes=10, input_size=224).eval()
    ours = build_model("owt", num_classes=10)
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv(x))


def test_configs_are_frozen():
    with pytest.raises(Exception):
        ModelConfig().num_classes = 3  # type: ignore[misc]


def test_the_package_names_its_public_objects_without_importing_torch():
    """`import alexnet` (the command's first step) leaves torch alone; each name of
    __all__ is its home module's object, listed by dir(); others are AttributeErrors."""
    import subprocess
    import sys

    import alexnet
    from alexnet import config, model

    code = "import sys, alexnet; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"
    homes = {"AlexNet": model, "build_model": model, "LRNConfig": config, "ModelConfig": config,
             "model_config": config}
    assert sorted(alexnet.__all__) == sorted(homes)
    for name, home in homes.items():
        assert getattr(alexnet, name) is getattr(home, name), name
    assert set(alexnet.__all__) <= set(dir(alexnet))
    with pytest.raises(AttributeError, match="module 'alexnet' has no attribute 'nope'"):
        alexnet.nope


@pytest.mark.parametrize("text, value", [
    ("train.lr=0.02", 0.02), ("train.lr=1e-3", 1e-3), ("train.epochs=90", 90), ("train.amp=\"bf16\"", "bf16"),
    # numbers as Python and the flags spell them, which JSON refuses (they stayed strings:
    # "train.lr must be a number, not '.01'", where --lr .01 was taken)
    ("train.lr=.01", 0.01), ("train.lr=5.", 5.0), ("train.dist_timeout=+30", 30.0), ("train.epochs=010", 10),
    ("train.lr=2.5E-2", 0.025),
    # and text stays text, a number's spelling included (data.path=007 was the number 7)
    ("data.path=/x", "/x"), ("data.path=1.2.3", "1.2.3"), ("train.amp=bf16", "bf16"), ("data.path=nan-data", "nan-data"),
    ("data.path=007", "007"), ("data.path=2024", "2024"), ("data.val_path=.5", ".5"),
])
def test_override_values(text, value):
    from alexnet.config import parse_override, run_config

    section, rest = text.split(".", 1)
    cfg = run_config("paper", parse_override(text))
    got = getattr(getattr(cfg, section), rest.split("=")[0])
    assert got == value and type(got) is type(value)


def test_override_numbers_keep_their_checks():
    from alexnet.config import parse_override, run_config

    for text, message in (("train.epochs=1.5", "train.epochs must be an integer, not 1.5"),
                          ("train.lr=NaN", "train.lr must be a finite number"),
                          ("train.lr=true", "train.lr must be a number, not True")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            run_config("paper", parse_override(text))
