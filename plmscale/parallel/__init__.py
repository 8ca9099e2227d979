"""Everything about process groups and sharding lives here, so model code never mentions it."""
