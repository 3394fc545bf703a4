// The browser build of the SDK (dist/browser/cape.js, one ES module) and the console's
// assets. The websocket opener is swapped for the browser's, and the build fails if any
// Node-only module (node:*, ws) would end up in the bundle.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");

const browserTransport = {
  name: "browser-transport",
  setup(b) {
    b.onResolve({ filter: /^\.\/node\.js$/ }, (args) =>
      args.importer.endsWith(join("transport", "index.ts"))
        ? { path: join(root, "src", "transport", "browser.ts") }
        : undefined,
    );
  },
};

export async function bundle(entry, outfile) {
  const result = await build({
    entryPoints: [join(root, entry)],
    outfile: outfile.startsWith("/") ? outfile : join(root, outfile),
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    minify: true,
    keepNames: true, // error classes keep their names (error.name) in the bundle
    legalComments: "eof",
    metafile: true,
    logLevel: "warning",
    plugins: [browserTransport],
  });
  const inputs = Object.keys(result.metafile.inputs);
  const nodeOnly = inputs.filter((p) => p.startsWith("node:") || /node_modules\/ws\//.test(p) || p.includes("/src/node/") || p.endsWith("transport/node.ts"));
  if (nodeOnly.length > 0) throw new Error(`Node-only modules in ${outfile}: ${nodeOnly.join(", ")}`);
  return result;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  mkdirSync(join(root, "dist", "browser"), { recursive: true });
  await bundle("src/index.ts", "dist/browser/cape.js");
  writeFileSync(join(root, "dist", "browser", "README"), "The browser build of the Cape SDK (one ES module).\n");
}

/** The console: bundle console/console.ts and copy its page and style next to it. */
export async function buildConsole(outDir) {
  mkdirSync(outDir, { recursive: true });
  await bundle("console/console.ts", join(outDir, "console.js"));
  for (const name of ["index.html", "console.css"]) copyFileSync(join(root, "console", name), join(outDir, name));
}

if (import.meta.url === `file://${process.argv[1]}`) {
  // The console ships inside the Python package (pip install needs no Node); a test checks
  // that the shipped files equal a fresh build.
  await buildConsole(process.env.CAPE_CONSOLE_OUT ?? join(root, "..", "src", "cape", "host", "console", "static"));
}
