//! The `kling` adapter against its recorded fixtures and the simulator. SKELETON.
