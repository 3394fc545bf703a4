package cape.verify;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import cape.errors.ChainException;
import cape.errors.CertificateExpiredException;
import cape.errors.DebugEnclaveException;
import cape.errors.FormatException;
import cape.errors.PcrMismatchException;
import cape.errors.SignatureException;
import cape.errors.VerificationException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.cert.X509Certificate;
import java.time.Instant;
import java.util.Base64;
import java.util.Map;
import java.util.Set;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/**
 * The verifier on the three real AWS Nitro documents in {@code shared/nitro-samples} (path in
 * {@code CAPE_NITRO_SAMPLES}; skipped without it). Their leaves expired long ago, so each is
 * checked at its own timestamp, as key documents are.
 */
class NitroSamplesTest {
    private static Path dir() {
        String env = System.getenv("CAPE_NITRO_SAMPLES");
        assumeTrue(env != null && Files.isDirectory(Path.of(env)), "CAPE_NITRO_SAMPLES is not set");
        return Path.of(env);
    }

    @BeforeEach
    void samplesPresent() {
        dir();
    }

    private static byte[] sample(String name) throws Exception {
        byte[] data = Files.readAllBytes(dir().resolve(name));
        return name.endsWith(".b64") ? Base64.getDecoder().decode(new String(data).strip()) : data;
    }

    private static X509Certificate awsRoot() throws Exception {
        return Roots.load(Files.readAllBytes(dir().resolve("AWS_NitroEnclaves_Root-G1.pem")));
    }

    @Test
    void realProductionDocumentsVerifyAtTheirTimestamp() throws Exception {
        X509Certificate root = awsRoot();
        assertEquals("641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b", Roots.fingerprint(root));
        AttestationDocument blocky = Verifier.verifyArchived(
                sample("blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64"), root, Map.of());
        assertEquals("i-0a22e5c5f24d22174-enc0191cceb4289903f", blocky.moduleId());
        assertEquals(1725719859545L, blocky.timestamp());
        AttestationDocument anjuna = Verifier.verifyArchived(
                sample("anjuna_prod_rsa-pubkey_us-east-2_2021-03-24.cose.bin"), root, Map.of());
        assertEquals("i-0a6d65e7122308898-enc017846bcd2f820da", anjuna.moduleId());
        // Pinning the document's own PCR0 passes; any other value is refused.
        byte[] pcr0 = blocky.pcrs().get(0);
        Verifier.verifyArchived(sample("blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64"), root,
                Map.of(0, Set.of(ByteBuffer.wrap(pcr0))));
        PcrMismatchException pin = assertThrows(PcrMismatchException.class, () -> Verifier.verifyArchived(
                sample("blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64"), root,
                Map.of(8, Set.of(ByteBuffer.wrap(filled(48, (byte) 1))))));
        assertEquals(8, pin.index());
    }

    private static byte[] filled(int length, byte value) {
        byte[] out = new byte[length];
        java.util.Arrays.fill(out, value);
        return out;
    }

    @Test
    void debugDocumentIsRefused() throws Exception {
        assertThrows(DebugEnclaveException.class, () -> Verifier.verifyArchived(
                sample("blocky-nitrite_debug_us-east-1_2024-09-07.cose.b64"), awsRoot(), Map.of()));
    }

    @Test
    void nowIsOutsideTheLeafWindow() throws Exception {
        byte[] doc = sample("blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64");
        assertThrows(CertificateExpiredException.class, () -> Verifier.verify(
                doc, awsRoot(), Instant.now(), Policy.live(null, Map.of())));
        // Within the window but 20 minutes after issue: too old for a live session.
        VerificationException old = assertThrows(VerificationException.class, () -> Verifier.verify(
                doc, awsRoot(), Instant.parse("2024-09-07T15:00:00Z"), Policy.live(null, Map.of())));
        assertTrue(old.getMessage().contains("more than 300 s"), old.getMessage());
    }

    @Test
    void tamperedDocumentsAreRefused() throws Exception {
        byte[] doc = sample("blocky-nitrite_prod_us-east-1_2024-09-07.cose.b64");
        byte[] flipped = doc.clone();
        flipped[flipped.length - 1] ^= 1;
        assertThrows(SignatureException.class, () -> Verifier.verifyArchived(flipped, awsRoot(), Map.of()));
        byte[] truncated = java.util.Arrays.copyOf(doc, doc.length - 10);
        assertThrows(FormatException.class, () -> Verifier.verifyArchived(truncated, awsRoot(), Map.of()));
        // Another operator's root: the blocky document does not chain to a simulated one.
        String other = System.getenv("CAPE_TEST_OTHER_ROOT");
        if (other != null) {
            X509Certificate otherRoot = Roots.load(Files.readAllBytes(Path.of(other)));
            assertThrows(ChainException.class, () -> Verifier.verifyArchived(doc, otherRoot, Map.of()));
        }
    }
}
