"""Resources: host inventories (the cost model, planner and allocation policies build on them)."""

from fastserve.resources.inventory import Host, Inventory, load_inventory, local_inventory

__all__ = ["Host", "Inventory", "load_inventory", "local_inventory"]
