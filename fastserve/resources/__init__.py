"""Resources: host inventories and allocation policies (the cost model and planner build on
them)."""

from fastserve.resources.inventory import Host, Inventory, load_inventory, local_inventory
from fastserve.resources.policies import Dynamic, Hybrid, Observation, Static, simulate

__all__ = ["Dynamic", "Host", "Hybrid", "Inventory", "Observation", "Static", "load_inventory",
           "local_inventory", "simulate"]
