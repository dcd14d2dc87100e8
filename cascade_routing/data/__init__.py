"""Data layer: the canonical RoutingDataset, converters for public outcome data, fetching."""

from cascade_routing.data.dataset import DatasetError, RoutingDataset

__all__ = ["DatasetError", "RoutingDataset"]
