//! The `vertex_veo` adapter against its recorded fixtures and the simulator. SKELETON.
