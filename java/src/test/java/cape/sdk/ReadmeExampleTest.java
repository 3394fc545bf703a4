package cape.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.tools.JavaCompiler;
import javax.tools.ToolProvider;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The example in java/README.md compiles against the SDK as built. */
class ReadmeExampleTest {
    /** Where the SDK and its jars were loaded from (the launcher's own class loader). */
    private static String classpath() throws Exception {
        StringBuilder path = new StringBuilder();
        for (Class<?> type : new Class<?>[] {Cape.class, com.google.gson.Gson.class,
                org.bouncycastle.crypto.digests.SHA256Digest.class}) {
            path.append(Path.of(type.getProtectionDomain().getCodeSource().getLocation().toURI()))
                    .append(java.io.File.pathSeparator);
        }
        return path.toString();
    }

    @Test
    void readmeExampleCompiles(@TempDir Path dir) throws Exception {
        Path readme = Path.of(System.getProperty("cape.readme", "README.md"));
        if (!Files.exists(readme)) {
            readme = Path.of("java", "README.md");
        }
        Matcher block = Pattern.compile("```java\n(.*?)```", Pattern.DOTALL).matcher(Files.readString(readme));
        assertTrue(block.find(), "no ```java block in " + readme);
        Path source = dir.resolve("Example.java");
        Files.writeString(source, block.group(1));
        JavaCompiler javac = ToolProvider.getSystemJavaCompiler();
        ByteArrayOutputStream errors = new ByteArrayOutputStream();
        int status = javac.run(null, null, errors, "-Xlint:all,-path", "-Werror", "-d", dir.toString(),
                "-cp", classpath(), source.toString());
        assertEquals(0, status, errors.toString(StandardCharsets.UTF_8));
        assertTrue(Files.exists(dir.resolve("Example.class")));
    }
}
