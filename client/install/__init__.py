"""Published versions at a site: verified, installed in the site's model store, and used."""
