//! The `minimax` adapter against its recorded fixtures and the simulator. SKELETON.
