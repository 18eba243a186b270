"""Set a distil graph's training inputs by name, wherever the node schema puts them: the everyday ones on the Train
node, the expert ones on its Decoupled DMD Settings node (added, with its defaults, when the graph has none)."""

from __future__ import annotations

SETTINGS_NODE_ID = "90"  # for graphs shipped without a Settings node; clear of the ids the tests add


def set_train_inputs(graph: dict, train_id: str = "3", add_settings: bool = True, **values) -> dict:
    """`add_settings` False: a graph without a Settings node keeps its shape (its expert values are dropped)."""
    from decoupled_dmd.nodes.dmd_nodes import Settings, Train

    spec = Train.INPUT_TYPES()
    on_train = set(spec["required"]) | set(spec.get("optional", {}))
    settings_spec = Settings.INPUT_TYPES()
    expert_spec = settings_spec["required"]  # a new Settings node: its optional inputs left out
    expert = {k: v for k, v in values.items() if k not in on_train}
    unknown = set(expert) - set(expert_spec) - set(settings_spec.get("optional", {}))
    if unknown:
        raise KeyError(f"neither a Train nor a Settings input: {sorted(unknown)}")
    graph[train_id]["inputs"].update({k: v for k, v in values.items() if k in on_train})
    if expert:
        link = graph[train_id]["inputs"].get("settings")
        if link is None and not add_settings:
            return graph
        if link is None:
            graph[SETTINGS_NODE_ID] = {"class_type": "DecoupledDMD_Settings",
                                       "inputs": {name: options["default"]
                                                  for name, (_, options) in expert_spec.items()}}
            link = graph[train_id]["inputs"]["settings"] = [SETTINGS_NODE_ID, 0]
        graph[link[0]]["inputs"].update(expert)
    return graph


def training_nodes(graph: dict, train_id: str = "3") -> list[str]:
    """The Train node's id and its Settings node's, if any."""
    link = graph[train_id]["inputs"].get("settings")
    return [train_id] + ([link[0]] if link else [])
