"""The watch: poll the sites, check the triggers, start a cycle when one fires."""
