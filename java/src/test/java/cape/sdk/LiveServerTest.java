package cape.sdk;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import cape.errors.ChecksumMismatchException;
import cape.errors.FormatException;
import cape.errors.FunctionException;
import cape.errors.PcrMismatchException;
import cape.errors.RequestRefusedException;
import cape.errors.UntrustedRootException;
import cape.errors.VerificationException;
import cape.verify.Roots;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.time.Duration;
import java.util.Base64;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.zip.ZipEntry;
import java.util.zip.ZipOutputStream;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Every call of the Java SDK against a live {@code cape serve}, started (with functions deployed
 * by the Python SDK) by {@code tests/e2e/test_java_sdk.py}, which passes it in {@code CAPE_TEST_*}
 * environment variables. Skipped (aborted) without them; the wrapper fails on any abort.
 */
class LiveServerTest {
    private static String url;
    private static Path ca;
    private static Path root;
    private static String user;
    private static String token;
    private static String otherUser;
    private static String otherToken;
    private static String echoId;
    private static String echoChecksum;

    @BeforeAll
    static void server() {
        url = System.getenv("CAPE_TEST_URL");
        assumeTrue(url != null, "CAPE_TEST_URL is not set: run tests/e2e/test_java_sdk.py");
        ca = Path.of(System.getenv("CAPE_TEST_CA"));
        root = Path.of(System.getenv("CAPE_TEST_ROOT"));
        user = System.getenv("CAPE_TEST_USER");
        token = System.getenv("CAPE_TEST_TOKEN");
        otherUser = System.getenv("CAPE_TEST_OTHER_USER");
        otherToken = System.getenv("CAPE_TEST_OTHER_TOKEN");
        echoId = System.getenv("CAPE_TEST_ECHO_ID");
        echoChecksum = System.getenv("CAPE_TEST_ECHO_CHECKSUM");
    }

    private static Cape.Builder builder(String bearer) {
        return Cape.builder().url(url).token(bearer).caFile(ca).root(root);
    }

    private static Cape client() {
        return builder(token).username(user).build();
    }

    private static byte[] bytes(String text) {
        return text.getBytes(StandardCharsets.UTF_8);
    }

    private static String text(byte[] data) {
        return new String(data, StandardCharsets.UTF_8);
    }

    private static byte[] zip(String source) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        try (ZipOutputStream archive = new ZipOutputStream(out)) {
            archive.putNextEntry(new ZipEntry("app.py"));
            archive.write(bytes(source));
            archive.closeEntry();
        }
        return out.toByteArray();
    }

    // -- keys and encryption ------------------------------------------------------------------

    @Test
    void keyOfAUserIsVerifiedAndIsThePythonSdksKey() {
        try (Cape cape = client()) {
            byte[] der = cape.key(user).getEncoded();
            assertArrayEquals(Base64.getDecoder().decode(System.getenv("CAPE_TEST_KEY_DER")), der);
            assertEquals(4096, cape.key(user.toUpperCase()).getModulus().bitLength());
            assertArrayEquals(der, cape.ownKey().getEncoded()); // the attested key session agrees
        }
    }

    @Test
    void ownKeyDocumentMustNameTheAccount() {
        try (Cape cape = builder(token).username(otherUser).build()) {
            VerificationException error = assertThrows(VerificationException.class, cape::ownKey);
            assertTrue(error.getMessage().contains("is for '" + user + "', not '" + otherUser + "'"),
                    error.getMessage());
        }
    }

    @Test
    void keysOfUnknownOrInvalidUsersAreRefused() {
        try (Cape cape = client()) {
            assertEquals(404, assertThrows(RequestRefusedException.class,
                    () -> cape.key("nobody-" + System.nanoTime())).status());
            assertThrows(FormatException.class, () -> cape.key("../etc"));
        }
    }

    @Test
    void rootByFingerprintIsCheckedAgainstTheServersRoot() throws IOException {
        String fingerprint = Roots.fingerprint(Roots.load(Files.readAllBytes(root)));
        try (Cape cape = Cape.builder().url(url).token(token).caFile(ca).root(fingerprint).build()) {
            assertEquals(4096, cape.key(user).getModulus().bitLength());
        }
        String wrong = "00".repeat(32);
        try (Cape cape = Cape.builder().url(url).token(token).caFile(ca).root(wrong).build()) {
            assertThrows(UntrustedRootException.class, () -> cape.key(user));
        }
        try (Cape cape = Cape.builder().url(url).token(token).caFile(ca).build()) {
            assertThrows(UntrustedRootException.class, () -> cape.run(echoId, bytes("x")));
        }
    }

    // -- running: plain and cape: inputs, cross-language --------------------------------------

    @Test
    void runPlainInputsByNameAndById() {
        try (Cape cape = client()) {
            assertEquals("hello", text(cape.run(user + "/echo", bytes("hello"))));
            assertEquals("", text(cape.run(echoId, new byte[0])));
            byte[] big = new byte[1 << 20];
            new SecureRandom().nextBytes(big);
            assertArrayEquals(big, cape.run(echoId, big));
        }
    }

    @Test
    void runCapeInputEncryptedInJava() {
        try (Cape cape = client()) {
            byte[] secret = cape.encrypt(bytes("java secret"), user);
            assertTrue(text(secret).startsWith("cape:"));
            assertEquals("java secret", text(cape.run(user + "/echo", secret)));
        }
    }

    @Test
    void runCapeInputEncryptedInPython() {
        try (Cape cape = client()) {
            byte[] python = bytes(System.getenv("CAPE_TEST_PY_CIPHERTEXT"));
            assertEquals(System.getenv("CAPE_TEST_PY_PLAINTEXT"), text(cape.run(echoId, python)));
        }
    }

    @Test
    void javaCiphertextForPython() throws IOException {
        try (Cape cape = client()) {
            Path out = Path.of(System.getenv("CAPE_TEST_OUT"), "java-ciphertext.txt");
            Files.write(out, cape.encrypt(bytes("encrypted in java"), user));
        }
    }

    @Test
    void unsealedResultsWorkToo() {
        try (Cape cape = builder(token).sealResults(false).build()) {
            assertEquals("plain", text(cape.run(echoId, bytes("plain"))));
        }
    }

    @Test
    void connectKeepsModuleStateForTheSession() {
        try (Cape cape = client()) {
            try (FunctionSession session = cape.connect(user + "/counter")) {
                assertEquals("1:a", text(session.invoke(bytes("a"))));
                assertEquals("2:b", text(session.invoke(bytes("b"))));
            }
            try (FunctionSession session = cape.connect(user + "/counter")) {
                assertEquals("1:c", text(session.invoke(bytes("c"))));
            }
        }
    }

    @Test
    void functionErrorsAreSealedAndKeepTheSession() {
        try (Cape cape = client(); FunctionSession session = cape.connect(user + "/failing")) {
            FunctionException error = assertThrows(FunctionException.class, () -> session.invoke(bytes("boom")));
            assertTrue(error.getMessage().contains("ValueError: boom"), error.getMessage());
            assertEquals("ok:next", text(session.invoke(bytes("next"))));
        }
    }

    @Test
    void anotherUsersCiphertextDoesNotOpenInThisFunction() {
        try (Cape cape = client(); FunctionSession session = cape.connect(echoId)) {
            byte[] forOther = cape.encrypt(bytes("for the other user"), otherUser);
            assertNotEquals(cape.key(user), cape.key(otherUser));
            assertThrows(FunctionException.class, () -> session.invoke(forOther));
            assertEquals("still here", text(session.invoke(bytes("still here"))));
        }
    }

    // -- pins ---------------------------------------------------------------------------------

    @Test
    void checksumPins() {
        try (Cape cape = client()) {
            try (FunctionSession session = cape.connect(echoId, echoChecksum.toUpperCase())) {
                assertEquals(echoChecksum, session.functionChecksum());
                assertEquals("pinned", text(session.invoke(bytes("pinned"))));
            }
            String other = "ab".repeat(32);
            assertThrows(ChecksumMismatchException.class, () -> cape.connect(echoId, other));
            assertThrows(FormatException.class, () -> cape.connect(echoId, "abc"));
        }
    }

    @Test
    void pcrPinsZeroToTwoAndEight() {
        Map<Integer, byte[]> pcrs;
        try (Cape cape = client(); FunctionSession session = cape.connect(echoId)) {
            pcrs = session.attestation().pcrs();
        }
        HexFormat hex = HexFormat.of();
        Cape.Builder pinned = builder(token);
        for (int index : List.of(0, 1, 2, 8)) {
            pinned.pcr(index, hex.formatHex(pcrs.get(index)));
        }
        try (Cape cape = pinned.build()) {
            assertEquals("pcr", text(cape.run(echoId, bytes("pcr"))));
        }
        byte[] other = pcrs.get(8).clone();
        other[0] ^= 1;
        try (Cape cape = builder(token).pcrs(Map.of(8, List.of(hex.formatHex(other)))).build()) {
            PcrMismatchException error = assertThrows(PcrMismatchException.class, () -> cape.run(echoId, bytes("x")));
            assertEquals(8, error.index());
            assertThrows(PcrMismatchException.class, () -> cape.key(user)); // key documents too
        }
        assertThrows(FormatException.class, () -> builder(token).pcr(0, "zz"));
    }

    // -- deploy, test, functions --------------------------------------------------------------

    @Test
    void deployRunListTestAndDelete() throws Exception {
        byte[] bundle = zip("def cape_handler(data):\n    return data.upper()\n");
        String checksum = HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(bundle));
        try (Cape cape = client()) {
            Deployed deployed = cape.deploy(bundle, "java-upper", false);
            assertEquals(checksum, deployed.checksum());
            assertEquals("ABC", text(cape.run(user + "/java-upper", bytes("abc"))));
            assertEquals("XYZ", text(cape.test(bundle, bytes("xyz"))));
            FunctionInfo listed = cape.functions().stream()
                    .filter(f -> f.id().equals(deployed.id())).findFirst().orElseThrow();
            assertEquals(checksum, listed.checksum());
            assertFalse(listed.isPublic());
            cape.deleteFunction(deployed.id());
            assertTrue(cape.functions().stream().noneMatch(f -> f.id().equals(deployed.id())));
            assertThrows(RequestRefusedException.class, () -> cape.run(deployed.id(), bytes("gone")));
            assertThrows(FormatException.class, () -> cape.deploy(bundle, "bad name!", false));
        }
    }

    // -- tokens and tenants -------------------------------------------------------------------

    @Test
    void scopedTokensWorkUntilDeleted() {
        try (Cape cape = client()) {
            CreatedToken created = cape.createToken("java-scoped", "from the Java SDK", echoId, Duration.ofHours(1));
            assertFalse(created.toString().contains(created.token()));
            TokenInfo info = cape.tokens().stream()
                    .filter(t -> t.id().equals(created.id())).findFirst().orElseThrow();
            assertEquals(echoId, info.functionId());
            assertEquals("from the Java SDK", info.description());
            try (Cape scoped = builder(created.token()).build()) {
                assertEquals("scoped", text(scoped.run(echoId, bytes("scoped"))));
                assertThrows(RequestRefusedException.class, () -> scoped.run(user + "/counter", bytes("x")));
                cape.deleteToken(created.id());
                assertThrows(RequestRefusedException.class, () -> scoped.run(echoId, bytes("revoked")));
            }
            assertTrue(cape.tokens().stream().noneMatch(t -> t.id().equals(created.id())));
        }
    }

    @Test
    void anotherTenantCannotRunOrDeleteAPrivateFunction() {
        try (Cape other = builder(otherToken).build()) {
            assertThrows(RequestRefusedException.class, () -> other.run(user + "/echo", bytes("x")));
            assertThrows(RequestRefusedException.class, () -> other.run(echoId, bytes("x")));
            assertThrows(RequestRefusedException.class, () -> other.deleteFunction(echoId));
            assertTrue(other.functions().stream().noneMatch(f -> f.id().equals(echoId)));
        }
        try (Cape cape = client()) {
            assertEquals("alive", text(cape.run(echoId, bytes("alive"))));
        }
    }

    @Test
    void signupAndLogin() {
        String name = "java" + HexFormat.of().formatHex(SecureRandom.getSeed(4));
        try (Cape anonymous = Cape.builder().url(url).caFile(ca).root(root).build()) {
            String first = anonymous.signup(name, "correct horse battery");
            String again = anonymous.login(name, "correct horse battery");
            try (Cape fresh = builder(again).build()) {
                assertEquals(List.of(), fresh.functions());
            }
            assertNotEquals("", first);
            assertEquals(401, assertThrows(RequestRefusedException.class,
                    () -> anonymous.login(name, "wrong password")).status());
        }
    }

    @Test
    void badTokensAndBadInputsAreClearErrors() {
        try (Cape cape = builder("not-a-token").build()) {
            assertEquals(401, assertThrows(RequestRefusedException.class, () -> cape.run(echoId, bytes("x"))).status());
            assertEquals(401, assertThrows(RequestRefusedException.class, cape::functions).status());
        }
        try (Cape cape = client()) {
            assertThrows(FormatException.class, () -> cape.run("not a function", bytes("x")));
            assertThrows(FormatException.class, () -> cape.deleteFunction("short"));
        }
        assertThrows(FormatException.class,
                () -> Cape.builder().url(url.replace("https://", "http://")).token(token).root(root).build().run(echoId, bytes("x")));
    }
}
