//! The `fal` adapter against its recorded fixtures and the simulator. SKELETON.
