"""Rollout-tree collection (GET_DATA): tree builder, HDF5 store, resumable/distributed runner,
training view."""

from .builder import GenPolicy, TreeConfig, build_trees
from .dataset import NodeExample, collate, node_examples
from .runner import CollectSpec, collect, label_trees, relabel
from .store import LabelledTrees, TreeFileError, read_trees, write_trees
from .tree import Node, Tree, chunk_upper, label_tree, sample_chunk_length

__all__ = [
    "GenPolicy", "TreeConfig", "build_trees", "NodeExample", "collate", "node_examples", "CollectSpec", "collect",
    "label_trees", "relabel", "LabelledTrees", "TreeFileError", "read_trees", "write_trees", "Node", "Tree",
    "chunk_upper", "label_tree", "sample_chunk_length",
]
