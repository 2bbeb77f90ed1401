//! The `luma` adapter against its recorded fixtures and the simulator. SKELETON.
