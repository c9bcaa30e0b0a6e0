package local.calmrun.devregistry;

import java.util.ArrayList;

import javax.enterprise.context.ApplicationScoped;
import javax.enterprise.inject.Produces;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;

/**
 * The bean that Apicurio's config-index extension builds at build time (the dynamic config properties),
 * whose deployment module the Maven mirror here does not serve: an empty list, so no property can be
 * changed at run time and every setting comes from the static configuration.
 */
@ApplicationScoped
public class NoDynamicProperties {

    @Produces
    @ApplicationScoped
    DynamicConfigPropertyList dynamicProperties() {
        return new DynamicConfigPropertyList(new ArrayList<>());
    }
}
