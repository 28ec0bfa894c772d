"""A client of the Kubernetes API, connected as every part of Fleetwatch that reads or changes a
cluster connects (remediation's backend, demand response's node labels and jobs): through the
official Python client (`pip install 'fleetwatch[kubernetes]'`), to the cluster a kubeconfig
names; none given: the pod's service account inside a cluster (KUBERNETES_SERVICE_HOST set),
else $KUBECONFIG or ~/.kube/config, as kubectl finds one. Nothing read is ever quoted back in
an error (a kubeconfig holds tokens), and the site's kubeconfig is never written."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError

_MIRROR = "kubernetes.io/config.mirror"  # the kubelet's copy of a static pod
_FINISHED = ("Succeeded", "Failed")


@dataclass
class Cluster:
    api: Any                 # kubernetes.client.CoreV1Api
    host: str                # the API server's URL, for messages
    where: str               # the identity in use, for messages: "the pod's service account" or "kubeconfig PATH"
    ApiException: type       # the client's error for an answer that is not a success
    HTTPError: type          # urllib3's, for no answer at all
    TimeoutError: type
    NewConnectionError: type


def connect(kubeconfig: str, setting: str, use: str) -> Cluster:
    """The cluster `kubeconfig` (the value of `setting`) names, for `use` (a setting and its
    value, e.g. "remediate.backend = kubernetes"). ConfigError says what to do when it cannot."""
    try:
        import urllib3
        import yaml
        from kubernetes import client, config
    except ImportError as e:
        raise ConfigError(f"{use} needs the Kubernetes Python client ({e}): pip install 'fleetwatch[kubernetes]'") \
            from None
    conf = client.Configuration()
    in_cluster = not kubeconfig and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"  # as kubectl finds one, read now
    where = "the pod's service account" if in_cluster else f"kubeconfig {path}"
    if kubeconfig and not os.path.isfile(os.path.expanduser(kubeconfig)):
        raise ConfigError(f"{setting}: no file {kubeconfig!r}: give the path of the kubeconfig that "
                          f"reaches the cluster, or leave it empty for the pod's service account")
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=conf)
        else:  # persist_config=False: fleetwatch never writes the site's kubeconfig
            config.load_kube_config(config_file=path, client_configuration=conf, persist_config=False)
    except config.ConfigException as e:
        raise ConfigError(f"cannot use {where} for {use} ({e}): set {setting} to a kubeconfig that reaches the "
                          f"cluster") from None
    except (OSError, yaml.YAMLError) as e:  # never str(e): a YAML error quotes the file, tokens included
        raise ConfigError(f"cannot read {where} for {use} ({type(e).__name__}): check that it is a readable "
                          f"kubeconfig (`kubectl --kubeconfig FILE get nodes`)") from None
    conf.retries = 0  # the caller tries again at its next round: a retry here would multiply the wait
    return Cluster(client.CoreV1Api(client.ApiClient(conf)), conf.host, where, client.ApiException,
                   urllib3.exceptions.HTTPError, urllib3.exceptions.TimeoutError,
                   urllib3.exceptions.NewConnectionError)


def unanswered(cluster: Cluster, error: Exception, timeout_s: float, doing: str, where: str,
               wait_hint: str = "") -> str:
    """What to say of an HTTPError (no answer at all) while `doing` ("while reading node X",
    "listing nodes"): timed out, or not reached (`where`: the kubeconfig in use). urllib3 wraps
    the cause in MaxRetryError; a refused connection is a NewConnectionError, which urllib3
    derives from its timeouts."""
    why = getattr(error, "reason", None) or error
    if isinstance(why, cluster.TimeoutError) and not isinstance(why, cluster.NewConnectionError):
        return (f"the Kubernetes API at {cluster.host} did not answer within {timeout_s:g} s {doing}: is the API "
                f"server up and reachable from here?{wait_hint}")
    return (f"cannot reach the Kubernetes API at {cluster.host} {doing} ({str(why).split(': ', 1)[-1]}): is the "
            f"API server up and reachable from here, and does {where} name the right server?")


def said(error: Any) -> str:
    """An ApiException as "HTTP 403 Forbidden: <the Status's message>" (the API server's Status
    names who was refused what; it never echoes a token)."""
    status = f"HTTP {error.status} {error.reason}"
    try:
        message = str(json.loads(error.body).get("message", ""))[:300]
    except (TypeError, ValueError, AttributeError):
        message = ""
    return status + (f": {message}" if message else "")


def needs_node(pod: Any) -> bool:
    """Does this pod keep its node busy? Not a DaemonSet's, a mirror pod or a finished one;
    a terminating pod still does until it is gone."""
    meta = pod.metadata
    if any(ref.controller and ref.kind == "DaemonSet" for ref in meta.owner_references or ()):
        return False
    if _MIRROR in (meta.annotations or {}):
        return False
    return (pod.status.phase if pod.status else None) not in _FINISHED
