//! The `seedance` adapter against its recorded fixtures and the simulator. SKELETON.
