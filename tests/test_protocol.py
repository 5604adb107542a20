"""Lesion protocols: the authors' eligibility rules per architecture, and the overrides."""

import pytest

from resens.analysis.protocol import PROTOCOLS, resolve_protocol
from resens.errors import ConfigError
from resens.models import cifar_plain, cifar_resnet, imagenet_resnet

CIFAR_FIRSTS = {0, 18, 36}
IMAGENET_FIRSTS = {0, 3, 27, 63}


@pytest.fixture(scope="module")
def resnet110():
    return cifar_resnet(110, width=4)


@pytest.fixture(scope="module")
def resnet200():
    return imagenet_resnet(200, width=4)


def test_cifar_resnet110_follows_the_authors(resnet110):
    p = resolve_protocol(resnet110)
    assert p.family == "cifar" and p.num_blocks == 54
    assert p.single == tuple(range(54))
    assert set(p.multi_deletion) == set(range(54)) - CIFAR_FIRSTS
    assert set(p.duplication) == set(range(54)) - CIFAR_FIRSTS
    assert p.reorder_ranges == ((1, 17), (19, 35), (37, 53))
    assert set(p.excluded) == CIFAR_FIRSTS and set(p.stage_firsts) == CIFAR_FIRSTS
    assert p.is_default and p.describe() == "authors' protocol"
    # the pre-activation network and the stochastic-depth one share the rule
    assert resolve_protocol(cifar_resnet(110, width=4, preact=True)) == p
    assert resolve_protocol(cifar_resnet(110, width=4, stochastic_depth=0.5)) == p


def test_imagenet_resnet200_follows_lesion_study_py(resnet200):
    p = resolve_protocol(resnet200)
    assert p.family == "imagenet" and p.num_blocks == 66
    assert p.single == tuple(range(66))
    assert set(p.multi_deletion) == set(range(66)) - IMAGENET_FIRSTS
    assert set(p.duplication) == set(range(66)) - IMAGENET_FIRSTS
    # lesion-study.py RANGES (5, 27), (29, 63), 1-based: stages 1 and 4 never reorder
    assert p.reorder_ranges == ((4, 26), (28, 62))
    assert p.reorder_stages == (1, 2)
    assert p.is_default


def test_plain_network_same_rules_fewer_deletable_blocks():
    p = resolve_protocol(cifar_plain(110, width=4))
    assert set(p.single) == set(range(54)) - {18, 36}  # shape-changing plain blocks cannot go
    assert set(p.multi_deletion) == set(range(54)) - CIFAR_FIRSTS
    assert p.reorder_ranges == ((1, 17), (19, 35), (37, 53))
    assert p.is_default


def test_exclude_nothing_includes_the_first_blocks_of_stages(resnet110, resnet200):
    p = resolve_protocol(resnet110, exclude=[])
    assert p.multi_deletion == tuple(range(54))
    # shape-changing blocks still never run twice nor move
    assert set(p.duplication) == set(range(54)) - {18, 36}
    assert p.reorder_ranges == ((0, 17), (19, 35), (37, 53))
    assert not p.is_default
    assert p.describe() == "custom protocol: first blocks of stages included"
    q = resolve_protocol(resnet200, exclude=[])
    assert q.multi_deletion == tuple(range(66))
    assert set(q.duplication) == set(range(66)) - IMAGENET_FIRSTS  # all four change the shape
    assert q.reorder_ranges == ((4, 26), (28, 62))


def test_exclude_and_reorder_stage_overrides(resnet110, resnet200):
    p = resolve_protocol(resnet110, exclude=[0, 18, 36, 10])
    assert 10 not in p.multi_deletion and 10 not in p.duplication
    assert p.reorder_ranges == ((1, 9), (11, 17), (19, 35), (37, 53))  # a range never spans 10
    assert "blocks 10 excluded" in p.describe()
    q = resolve_protocol(resnet110, reorder_stages=[0])
    assert q.reorder_ranges == ((1, 17),) and "reordering stages 0" in q.describe()
    assert resolve_protocol(resnet110, reorder_stages=[]).reorder_ranges == ()
    # the authors' rule given explicitly is the default
    assert resolve_protocol(resnet110, exclude=[36, 0, 18], reorder_stages=[0, 1, 2]).is_default
    r = resolve_protocol(resnet200, reorder_stages=[0, 1, 2, 3])
    assert r.reorder_ranges == ((1, 2), (4, 26), (28, 62), (64, 65))


def test_bad_overrides_are_one_line_errors(resnet110):
    for kwargs, match in [
        ({"exclude": [54]}, "analysis.protocol.exclude: blocks \\[54\\] out of range 0..53"),
        ({"reorder_stages": [3]}, "analysis.protocol.reorder_stages: stages \\[3\\] out of range 0..2"),
    ]:
        with pytest.raises(ConfigError, match=match) as info:
            resolve_protocol(resnet110, **kwargs)
        assert "\n" not in str(info.value)
    # a stage whose only blocks change the shape cannot be reordered
    small = imagenet_resnet(layers=(1, 3, 3, 1), width=4)
    with pytest.raises(ConfigError, match="shape-changing blocks never move") as info:
        resolve_protocol(small, reorder_stages=[0])
    assert "\n" not in str(info.value)


def test_every_builder_names_a_known_family():
    assert {cifar_resnet(20).protocol, cifar_plain(20).protocol, imagenet_resnet(26, width=4).protocol} <= set(PROTOCOLS)
    model = cifar_resnet(20)
    model.protocol = "mystery"
    with pytest.raises(ConfigError, match="mystery"):
        resolve_protocol(model)
