"""New records joining a site's store: checked, masked, deduplicated, split, replaced as one."""
