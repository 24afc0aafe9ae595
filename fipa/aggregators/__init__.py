"""Server rules, chosen by name through the Hydra group `aggregator`."""

from fipa.aggregators.base import Aggregator
from fipa.aggregators.fedavg import FedAvg, FedProx
from fipa.aggregators.fedfisher import FedFisher
from fipa.aggregators.fednova import FedNova
from fipa.aggregators.fipa import FIPA

__all__ = ["FIPA", "Aggregator", "FedAvg", "FedFisher", "FedNova", "FedProx"]
