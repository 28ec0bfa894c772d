"""Flexibility classes (power/classes.py): by node, or by the workload the samples carry
(a Kubernetes namespace or pod), the first matching rule winning; and a GPU's class follows
the job on it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, FlexRule, PowerConfig, load_config
from pipeline.model import GPU_SAMPLE
from pipeline.power.actuator import Actuator
from pipeline.power.classes import FlexClasses
from pipeline.power.controller import Controller
from pipeline.power.curve import from_recording
from tests.conftest import make_config
from tests.test_batching import of_schema

RULES = [FlexRule("r01-*", 0), FlexRule(namespace="inference*", flex_class=0),
         FlexRule(namespace="batch", pod="train-*", flex_class=3), FlexRule("r02-*", 1)]


def test_the_first_rule_whose_globs_all_match_wins():
    c = FlexClasses(PowerConfig(default_class=2, classes=RULES))
    assert c.of("r01-n01", "batch", "train-7") == 0              # the node rule comes first
    assert c.of("r03-n01", "inference-eu", "llm-0") == 0        # any node of an inference namespace
    assert c.of("r03-n01", "batch", "train-7") == 3
    assert c.of("r03-n01", "batch", "etl-1") == 2               # its pod does not match: the default
    assert c.of("r02-n04", "batch", "etl-1") == 1
    assert c.of("r02-n04", None, None) == 1 and c.of("r04-n01") == 2  # no workload known


def test_a_namespace_rule_needs_no_node_glob_in_the_config_file(tmp_path):
    path = tmp_path / "fw.toml"
    path.write_text('[[power.classes]]\nnamespace = "inference"\nflex_class = 0\n')
    rule = load_config(str(path), env={}).power.classes[0]
    assert (rule.nodes, rule.namespace, rule.pod, rule.flex_class) == ("*", "inference", "", 0)


names = st.sampled_from(["r01-n01", "r02-n04", "r03-n01", "r03-n02"])
labels = st.one_of(st.none(), st.sampled_from(["inference-eu", "batch", "dev"]))
pods = st.one_of(st.none(), st.sampled_from(["train-7", "llm-0", "etl-1"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(names, labels, pods), min_size=1, max_size=40), st.integers(0, 3))
def test_a_batch_is_classed_as_each_row_alone(rows, default):
    c = FlexClasses(PowerConfig(default_class=default, classes=RULES))
    batch = of_schema(GPU_SAMPLE, node=[r[0] for r in rows], namespace=[r[1] for r in rows],
                      pod=[r[2] for r in rows])
    assert c.of_rows(batch).tolist() == [c.of(*r) for r in rows]


def test_a_gpus_class_follows_the_job_on_it():
    class Nowhere(Actuator):
        def apply(self, caps):
            pass
    ctl = Controller("site-a", from_recording(), Nowhere(),
                     make_config(power={"classes": [{"namespace": "inference", "flex_class": 0}]}).power)

    def sample(namespace):
        return of_schema(GPU_SAMPLE, node=["r03-n01"], gpu_uuid=["GPU-1"], namespace=[namespace], pod=["p-0"],
                         power_w=[650.0], util_gpu=[0.9], power_limit_w=[700.0])
    ctl.observe_gpus(sample("batch"))
    assert ctl.gpus.flex.tolist() == [2]
    ctl.observe_gpus(sample("inference"))  # an inference job took the GPU: never capped now
    assert ctl.gpus.flex.tolist() == [0]
    assert np.isclose(ctl.flexible_kw(), 0.0)


def test_a_gpu_pods_share_takes_the_most_protective_of_their_classes():
    c = FlexClasses(PowerConfig(default_class=2, classes=RULES))
    assert c.of("r03-n01", "inference-eu,batch", "llm-0,train-7") == 0
    assert c.of("r03-n01", "batch,inference-eu", "train-7,llm-0") == 0
    assert c.of("r03-n01", "batch,batch", "train-7,train-8") == 3
    assert c.of("r03-n01", "batch,dev", "train-7,x") == 2  # dev's pod has no rule: the default


def test_a_feature_rule_without_a_source_of_labels_is_refused_saying_what_to_set(tmp_path):
    """No labels are read (power.node_labels = "none"): the rule would match no node, and the
    nodes it means to protect would be capped at the default class."""
    path = tmp_path / "fw.toml"
    rule = '[[power.classes]]\nfeature = "noflex"\nflex_class = 0\n'
    path.write_text(rule)
    with pytest.raises(ConfigError, match=r"feature = 'noflex'.*set power.node_labels = \"slurm\""):
        load_config(str(path), env={})
    assert load_config(str(path), env={"FLEETWATCH_POWER__NODE_LABELS": "slurm"}).power.classes[0].feature == "noflex"
    path.write_text('[power]\nnode_labels = "kubernetes"\n' + rule)
    assert load_config(str(path), env={}).power.node_labels == "kubernetes"
